"""The records port's HTTP/1.1 protocol, in-process over a stand-in
transport: long-polling served in the protocol (a held GET written by the
send that wakes it, bodies in chunks), and everything else handed whole to
uvicorn's own protocol. Real clients: tests/integration."""

from __future__ import annotations

import asyncio
import json
import logging
import types

import pytest
import uvicorn
from channels_common.wsserver import LeanWebSocketProtocol
from channels_records.httpserver import RecordsHttpProtocol
from channels_records.polling import Cors, Polling
from channels_records.sockets import Engine
from channels_records.websocket import WebSockets

from tests.support import HttpTransport as Transport
from tests.support import masked, settle

ORIGIN = b"https://app.test"


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/silent":
        return
    if path == "/echo":
        message = await receive()
        body = message["body"]
        await send({"type": "http.response.start", "status": 201, "headers": [
            (b"content-length", str(len(body)).encode()), (b"x-method", scope["method"].encode()),
            (b"x-query", scope["query_string"]), (b"x-client", scope["client"][0].encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"ab", b"", b"cde"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": path[-2:].encode()})


def make(max_payload=1000, keep_alive_seconds=5.0, engine_websockets=False):
    messages = []
    engine = Engine(max_payload=max_payload, on_message=lambda sock, data: messages.append(data))
    config = uvicorn.Config(asgi_app, lifespan="off", log_config=None, ws=LeanWebSocketProtocol)
    config.load()
    state = types.SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
    cors = Cors(ORIGIN.decode())
    cls = RecordsHttpProtocol.serving(
        Polling(engine, cors), app=asgi_app, websocket=LeanWebSocketProtocol,
        engine_websockets=WebSockets(engine, cors) if engine_websockets else None,
        keep_alive_seconds=keep_alive_seconds,
    )

    def connect():
        protocol = cls(config, state, {})
        transport = Transport()
        protocol.connection_made(transport)
        return protocol, transport

    return engine, connect, messages, state


def request(method, target, headers=(), body=b""):
    lines = [f"{method} {target} HTTP/1.1", "Host: x", *headers]
    if body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_handshake_poll_post_and_a_held_get_written_by_the_send():
    engine, connect, messages, state = make()
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling", [f"Origin: {ORIGIN.decode()}"]))
    [(status, headers, body)] = t.take()
    assert status == b"HTTP/1.1 200 OK" and body.startswith(b"0{")
    assert headers[b"content-type"] == b"text/plain; charset=UTF-8"
    assert headers[b"access-control-allow-origin"] == ORIGIN
    assert headers[b"access-control-allow-credentials"] == b"true"
    sid = json.loads(body[1:])["sid"]
    chunked = request(
        "POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", ["Transfer-Encoding: chunked"],
        b"1\r\n4\r\n3\r\n0{}\r\n0\r\n\r\n",
    )
    for i in range(0, len(chunked), 7):  # the request in small reads
        p.data_received(chunked[i:i + 7])
    [(status, headers, body)] = t.take()
    assert (status, body, headers[b"content-type"]) == (b"HTTP/1.1 200 OK", b"ok", b"text/html")
    assert messages == ["0{}"]
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    assert t.take() == [] and not t.paused  # held; reading goes on
    engine.sockets[sid].send('42["records",{}]')
    [(status, _, body)] = t.take()
    assert body == b'42["records",{}]' and not t.paused and engine.sockets[sid].waiter is None
    engine.sockets[sid].send("42[2]")  # no poll held: it waits for the next one
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    assert [r[2] for r in t.take()] == [b"42[2]"]
    assert p in state.connections and not t.closed


async def test_refusals_limits_and_connection_close():
    engine, connect, messages, _ = make(max_payload=10)
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling&sid=nope"))
    [(status, _, body)] = t.take()
    assert (status, body) == (b"HTTP/1.1 400 Bad Request", b'{"code":1,"message":"Session ID unknown"}')
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling", ["Origin: https://evil.test"]))
    [(status, headers, _)] = t.take()
    assert status.startswith(b"HTTP/1.1 400") and b"access-control-allow-origin" not in headers
    assert b"access-control-allow-credentials" not in headers
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    p.data_received(request("POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", body=b"4" * 11))
    assert t.take()[0][0] == b"HTTP/1.1 413 Payload Too Large"
    p.data_received(request(
        "POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", ["Transfer-Encoding: chunked"],
        b"6\r\n444444\r\n6\r\n444444\r\n0\r\n\r\n",
    ))
    assert t.take()[0][0] == b"HTTP/1.1 413 Payload Too Large" and messages == []
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}", ["Connection: close"]))
    assert t.take() == [] and not t.closed
    engine.sockets[sid].close("forced close")  # the held poll carries the CLOSE, then the connection ends
    [(_, headers, body)] = t.take()
    assert body == b"1" and headers[b"connection"] == b"close" and t.closed
    q, u = connect()
    q.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert u.take()[0][0] == b"HTTP/1.1 400 Bad Request" and u.closed


async def test_other_requests_are_served_by_the_application():
    _engine, connect, _, state = make()
    p, t = connect()
    raw = request("GET", "/healthz")
    p.data_received(raw[:10])
    p.data_received(raw[10:])
    assert t.paused  # nothing more is read while the application answers
    await settle()
    [(status, _, body)] = t.take()
    assert status == b"HTTP/1.1 200 OK" and body == b"hz"  # answered by the ASGI app
    assert t.protocol is None and p in state.connections and not t.paused and not state.tasks
    # after a long-poll on the same connection, too
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    assert len(t.take()) == 1
    p.data_received(request("GET", "/metrics"))
    await settle()
    assert t.take()[0][2] == b"cs" and not t.closed
    # a body, the scope, and pipelined requests answered in order
    p.data_received(request("POST", "/echo?a=1", body=b"hello") + request("GET", "/xyz")
                    + request("HEAD", "/echo", body=b"abc"))
    await settle()
    [(s1, h1, b1), (s2, _, b2), (s3, h3, b3)] = t.take()
    assert (s1, b1, h1[b"x-method"], h1[b"x-query"], h1[b"x-client"]) == (
        b"HTTP/1.1 201 Created", b"hello", b"POST", b"a=1", b"127.0.0.1")
    assert (s2, b2) == (b"HTTP/1.1 200 OK", b"yz")
    # HEAD: the length of what GET would send, no body
    assert s3 == b"HTTP/1.1 201 Created" and h3[b"x-method"] == b"HEAD"
    assert h3[b"content-length"] == b"3" and b3 == b"" and t.data == b""


async def test_application_responses_chunked_errors_and_connection_close(caplog):
    _engine, connect, _, _ = make()
    p, t = connect()
    p.data_received(request("GET", "/stream"))
    await settle()
    assert bytes(t.data) == (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    t.data.clear()
    with caplog.at_level(logging.ERROR, logger="channels.records.http"):
        p.data_received(request("GET", "/boom"))
        await settle()
    [(status, headers, body)] = t.take()
    assert status == b"HTTP/1.1 500 Internal Server Error" and headers[b"connection"] == b"close" and t.closed
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    p, t = connect()
    p.data_received(request("GET", "/silent"))
    await settle()
    assert t.take()[0][0] == b"HTTP/1.1 500 Internal Server Error" and t.closed
    p, t = connect()
    p.data_received(request("GET", "/ok", ["Connection: close"]))
    await settle()
    [(status, headers, body)] = t.take()
    assert body == b"ok" and headers[b"connection"] == b"close" and t.closed
    p, t = connect()  # a body over the bound is refused, not kept
    p.data_received(request("POST", "/echo", body=b"x" * (1024 * 1024 + 1)))
    assert t.take()[0][0] == b"HTTP/1.1 413 Payload Too Large" and t.closed


async def test_a_websocket_upgrade_is_handed_whole_to_our_websocket_protocol():
    _engine, connect, _, state = make()
    p, t = connect()
    raw = request("GET", "/socket.io/?EIO=4&transport=websocket", [
        "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ])
    p.data_received(raw[:20])
    p.data_received(raw[20:])
    assert isinstance(t.protocol, LeanWebSocketProtocol)
    assert p not in state.connections and t.protocol in state.connections
    assert t.protocol.scope["query_string"] == b"EIO=4&transport=websocket"  # it read the whole request
    # an upgrade pipelined behind a request served here cannot be handed over
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling") + raw)
    assert t.protocol is None and t.closed and t.take()[-1][0] == b"HTTP/1.1 400 Bad Request"


async def test_shutdown_answers_a_held_poll_and_closes_idle_connections():
    _engine, connect, _, _ = make()
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    p.shutdown()
    [(_, headers, body)] = t.take()
    assert body == b"6" and headers[b"connection"] == b"close" and t.closed
    q, u = connect()
    q.shutdown()
    assert u.closed


async def test_a_cut_long_poll_ends_its_session_and_big_bodies_are_not_kept():
    closes = []
    engine, connect, _, _ = make(max_payload=10)
    engine.on_close = lambda sock, reason: closes.append(reason)
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    head = request("POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", ["Transfer-Encoding: chunked"])
    p.data_received(head)
    for _ in range(100):
        p.data_received(b"400\r\n" + b"4" * 1024 + b"\r\n")  # 100 KiB of body, over the limit
    assert len(p.buffer) == 0  # served here: the body is neither buffered nor kept
    p.data_received(b"0\r\n\r\n")
    assert t.take()[0][0] == b"HTTP/1.1 413 Payload Too Large"
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    p.connection_lost(None)
    assert closes == ["transport error"] and sid not in engine.sockets
    q, u = connect()
    q.data_received(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"x" * 70000)
    assert u.take()[0][0] == b"HTTP/1.1 400 Bad Request" and u.closed


async def test_a_client_not_reading_its_responses_is_not_read_from():
    engine, connect, _, _ = make()
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    p.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    p.pause_writing()  # the transport's buffer is past its high-water mark
    engine.sockets[sid].send("42[1]")
    assert t.take()[0][2] == b"42[1]" and t.paused  # answered, but no next request is read
    p.resume_writing()
    assert not t.paused
    p.data_received(request(
        "POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", ["Expect: 100-continue"], b"3",
    ))
    assert t.data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")


@pytest.mark.slow  # seconds of real waiting: make test, not test-fast
async def test_idle_connections_are_closed_by_one_sweep_but_a_held_poll_is_not_idle():
    engine, connect, _, _ = make(keep_alive_seconds=0.5)
    silent, silent_t = connect()  # never sends a byte
    answered, answered_t = connect()
    answered.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(answered_t.take()[0][2][1:])["sid"]
    held, held_t = connect()
    held.data_received(request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}"))
    half, half_t = connect()
    half.data_received(b"GET /healthz HTTP/1.1\r\n")  # a request under way
    await asyncio.sleep(0.3)
    assert not any(t.closed for t in (silent_t, answered_t, held_t, half_t))
    answered.data_received(request("GET", "/socket.io/?EIO=4&transport=polling&sid=nope"))  # activity
    await asyncio.sleep(0.4)
    assert silent_t.closed and not answered_t.closed
    await asyncio.sleep(0.4)
    assert answered_t.closed and not held_t.closed and not half_t.closed
    for p in (silent, answered):
        p.connection_lost(None)
    engine.sockets[sid].send("42[1]")  # answering the held poll starts its idle time
    assert held_t.take()[0][2] == b"42[1]"
    await asyncio.sleep(0.8)
    assert held_t.closed and not half_t.closed


async def test_a_request_sent_behind_a_held_poll_ends_the_connection_once_the_poll_is_answered():
    engine, connect, _, _ = make()
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    poll = request("GET", f"/socket.io/?EIO=4&transport=polling&sid={sid}")
    p.data_received(poll)
    p.data_received(request("GET", "/healthz"))  # no real client does this
    assert t.paused and not t.closed and t.take() == []
    engine.sockets[sid].send("42[1]")
    [(_, _, body)] = t.take()
    assert body == b"42[1]" and t.closed and t.data == b""  # the held poll answered, nothing else


UPGRADE = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13"]


async def test_an_engineio_upgrade_is_accepted_here_from_the_request_as_read():
    engine, connect, messages, state = make(engine_websockets=True)
    p, t = connect()
    raw = request("GET", "/socket.io/?EIO=4&transport=websocket", UPGRADE)
    p.data_received(raw[:30])
    p.data_received(raw[30:] + masked(0x81, b"40"))  # the client's first frame in the same read
    ws = t.protocol
    assert isinstance(ws, LeanWebSocketProtocol) and ws in state.connections and p not in state.connections
    head, _, frames = bytes(t.data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    # the OPEN packet goes out in the same write, and the session is on its websocket
    assert frames[0] == 0x81 and frames[2:3] == b"0"
    sid = json.loads(frames[3:])["sid"]
    assert engine.sockets[sid].transport is t and messages == ["0"]
    # a polling session's upgrade: accepted without frames; a second one at once is closed
    q, u = connect()
    q.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    psid = json.loads(u.take()[0][2][1:])["sid"]
    for _ in range(2):
        v = Transport()
        r = type(p)(p.config, state, {})
        r.connection_made(v)
        r.data_received(request("GET", f"/socket.io/?EIO=4&transport=websocket&sid={psid}", UPGRADE))
        assert v.data.startswith(b"HTTP/1.1 101 ")
    assert v.data.endswith(b"\x88\x02\x03\xe8")  # the second: a close frame, 1000
    assert engine.sockets[psid].upgrading


@pytest.mark.parametrize(("target", "headers", "status"), [
    ("/socket.io/?EIO=4&transport=websocket", [*UPGRADE[:3], "Sec-WebSocket-Version: 8"], b"426"),
    ("/socket.io/?EIO=4&transport=websocket", [*UPGRADE[:2], "Sec-WebSocket-Key: short", UPGRADE[3]], b"400"),
    ("/socket.io/?EIO=4&transport=websocket", [*UPGRADE, "Origin: https://evil.test"], b"403"),
    ("/socket.io/?EIO=4&transport=websocket&sid=nope", UPGRADE, b"403"),
    ("/socket.io/?EIO=3&transport=websocket", UPGRADE, b"403"),
])
async def test_engineio_upgrades_refused_here_as_the_websocket_protocol_refuses_them(target, headers, status):
    engine, connect, _, state = make(engine_websockets=True)
    p, t = connect()
    p.data_received(request("GET", target, headers))
    assert t.data.startswith(b"HTTP/1.1 " + status) and t.closed and not engine.sockets
    assert t.protocol is None and not state.connections - {p}


async def test_a_bad_request_pipelined_behind_an_application_response_does_not_answer_ahead_of_it():
    # The 400 was written at once, ahead of the earlier request's response:
    # the client read it as the answer to its first request.
    _, connect, _, _ = make()
    p, t = connect()
    p.data_received(request("POST", "/echo", body=b"hi") + b"\x00garbage\r\n\r\n")
    await settle()
    [(status, _, body)] = t.take()
    assert (status, body) == (b"HTTP/1.1 201 Created", b"hi") and t.closed


async def test_a_polling_body_declared_over_the_limit_is_refused_from_its_head():
    # The 413 waited for the whole declared body (which nothing keeps).
    _, connect, messages, _ = make(max_payload=10)
    p, t = connect()
    p.data_received(request("GET", "/socket.io/?EIO=4&transport=polling"))
    sid = json.loads(t.take()[0][2][1:])["sid"]
    head = request("POST", f"/socket.io/?EIO=4&transport=polling&sid={sid}", [f"Content-Length: {2**40}"])
    p.data_received(head + b"4" * 100)
    assert t.take()[0][0] == b"HTTP/1.1 413 Payload Too Large" and messages == []
