"""The engine's sessions and its two adapters, driven in-process: long-polling
through its ASGI interface (bodies in pieces, as a chunked request arrives),
the websocket upgrade through the callbacks the lean protocol calls, and
the one pinger's rounds. Real clients: tests/integration."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from channels_records import sockets as sockets_module
from channels_records.polling import AsgiPolling, Cors, Polling
from channels_records.sockets import Engine
from channels_records.websocket import Upgrade

from tests.support import FakeProtocol

ORIGIN = "https://app.test"


class Recorder:
    def __init__(self):
        self.messages, self.closes = [], []

    def on_message(self, sock, data):
        self.messages.append((sock.sid, data))

    def on_close(self, sock, reason):
        self.closes.append((sock.sid, reason))


def make(max_payload=1000):
    rec = Recorder()
    engine = Engine(
        ping_interval=25, ping_timeout=20, max_payload=max_payload, on_message=rec.on_message, on_close=rec.on_close
    )
    return engine, AsgiPolling(Polling(engine, Cors(ORIGIN))), rec


async def request(app, method, query, body_parts=(b"",), headers=()):
    scope = {
        "type": "http", "method": method, "path": "/socket.io/", "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in headers], "scheme": "http",
    }
    parts = list(body_parts)
    sent = []

    async def receive():
        if not parts:
            return {"type": "http.disconnect"}
        body = parts.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], sent[1]["body"]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def handshake(app):
    status, headers, body = await request(app, "GET", "EIO=4&transport=polling")
    assert status == 200 and headers["content-type"] == "text/plain; charset=UTF-8"
    return json.loads(body[1:])


async def test_handshake_cors_and_refusals():
    engine, app, _ = make()
    status, headers, body = await request(app, "GET", "EIO=4&transport=polling&t=x", headers=[("origin", ORIGIN)])
    opened = json.loads(body[1:])
    assert status == 200 and body[:1] == b"0"
    assert opened["upgrades"] == ["websocket"] and opened["pingInterval"] == 25000
    assert opened["pingTimeout"] == 20000 and opened["maxPayload"] == 1000
    assert headers["access-control-allow-origin"] == ORIGIN
    assert headers["access-control-allow-credentials"] == "true"
    assert opened["sid"] in engine.sockets
    status, headers, body = await request(app, "GET", "EIO=4&transport=polling", headers=[("origin", "https://evil.test")])
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, _ = await request(
        app, "OPTIONS", "EIO=4&transport=polling",
        headers=[("origin", ORIGIN), ("access-control-request-headers", "content-type")],
    )
    assert status == 200 and headers["access-control-allow-methods"] == "OPTIONS, GET, POST"
    assert headers["access-control-allow-headers"] == "content-type"
    status, headers, body = await request(app, "GET", "EIO=4&transport=polling&sid=nope")
    assert (status, body) == (400, b'{"code":1,"message":"Session ID unknown"}')
    assert headers["content-type"] == "application/json"
    status, _, body = await request(app, "POST", "EIO=4&transport=polling", [b"40"])
    assert (status, body) == (400, b'{"code":2,"message":"Bad handshake method"}')
    status, _, body = await request(app, "GET", "EIO=3&transport=polling")
    assert (status, body) == (400, b'{"code":5,"message":"Unsupported protocol version"}')
    status, _, body = await request(app, "GET", "EIO=4&transport=carrier-pigeon")
    assert (status, body) == (400, b'{"code":0,"message":"Transport unknown"}')
    status, _, _ = await request(app, "PUT", "EIO=4&transport=polling")
    assert status == 405


async def test_a_body_in_pieces_is_read_whole_and_its_packets_dispatched_in_order():
    _engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    parts = [b"4", b"0", b'{"pid":', b'"p"}\x1e', b"3\x1e4", b"1"]  # how a chunked body arrives
    status, headers, body = await request(app, "POST", f"EIO=4&transport=polling&sid={sid}", parts)
    assert (status, body, headers["content-type"]) == (200, b"ok", "text/html")
    assert rec.messages == [(sid, '0{"pid":"p"}'), (sid, "1")]


async def test_held_poll_is_answered_with_everything_sent_meanwhile():
    engine, app, _ = make()
    sid = (await handshake(app))["sid"]
    sock = engine.sockets[sid]
    poll = asyncio.ensure_future(request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))
    await asyncio.sleep(0.01)
    assert not poll.done() and sock.waiter is not None
    sock.send('40{"sid":"x"}')
    sock.send('42["records",{"é":1}]')
    status, _, body = await poll
    assert status == 200 and body == '40{"sid":"x"}\x1e42["records",{"é":1}]'.encode()
    assert sock.pending == [] and sock.pending_bytes == 0


async def test_overlapping_polls_close_the_session():
    _engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    first = asyncio.ensure_future(request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))
    await asyncio.sleep(0.01)
    status, _, body = await request(app, "GET", f"EIO=4&transport=polling&sid={sid}")
    assert (status, body) == (400, b'{"code":3,"message":"Bad request"}')
    assert rec.closes == [(sid, "transport error")]
    assert (await first)[2] == b"1"  # the held poll carries the CLOSE packet


async def test_oversized_and_malformed_bodies(caplog):
    engine, app, rec = make(max_payload=10)
    sid = (await handshake(app))["sid"]
    query = f"EIO=4&transport=polling&sid={sid}"
    assert (await request(app, "POST", query, [b"4" * 11], headers=[("content-length", "11")]))[0] == 413
    assert (await request(app, "POST", query, [b"4" * 6, b"4" * 6]))[0] == 413  # chunked: counted as read
    assert rec.messages == [] and sid in engine.sockets  # as engine.io: refused, the session lives on
    with caplog.at_level(logging.WARNING):
        status, _, body = await request(app, "POST", query, [b"\x1e\x1e4\x1e"])
    assert (status, body) == (200, b"ok")  # as engine.io answers, closing the session
    assert rec.closes == [(sid, "parse error")] and rec.messages == []
    assert "malformed request from client, rejected" in caplog.text
    assert (await request(app, "GET", query))[2] == b"1"  # its CLOSE packet
    sid2 = (await handshake(app))["sid"]
    status, _, _ = await request(
        app, "POST", f"EIO=4&transport=polling&sid={sid2}", [b"40"], headers=[("content-type", "application/octet-stream")]
    )
    assert status == 400 and rec.closes[-1] == (sid2, "transport error")


async def test_closed_polling_session_gives_its_close_packet_then_goes(monkeypatch):
    monkeypatch.setattr(sockets_module, "CLOSE_LINGER_SECONDS", 0.05)
    engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    engine.sockets[sid].close("forced close")
    assert rec.closes == [(sid, "forced close")]
    assert (await request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))[2] == b"1"
    await asyncio.sleep(0.1)
    assert sid not in engine.sockets
    assert (await request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))[0] == 400


def texts(transport):
    return [w[2:].decode() for w in transport.writes]


async def test_upgrade_probe_then_switch_flushes_pending_in_order():
    engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    sock = engine.sockets[sid]
    poll = asyncio.ensure_future(request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))
    await asyncio.sleep(0.01)
    ws = FakeProtocol()
    sock.upgrading, sock.websocket = True, ws
    up = Upgrade(sock, ws)
    up.on_message("2probe")
    assert texts(ws.transport) == ["3probe"]
    assert (await poll)[2] == b"6"  # the NOOP ends the pending poll
    sock.send("42[1]")  # sent between the probe and the upgrade: waits
    up.on_message("5")
    sock.send("42[2]")
    assert texts(ws.transport) == ["3probe", "42[1]", "42[2]"]
    assert sock.transport is ws.transport and sock.transport_name == "websocket"
    status, _, body = await request(app, "GET", f"EIO=4&transport=polling&sid={sid}")
    assert (status, body) == (400, b'{"code":3,"message":"Bad request"}')
    up.on_message("40")
    assert rec.messages == [(sid, "0")]
    up.on_close(1006)
    assert rec.closes == [(sid, "transport close")] and sid not in engine.sockets


async def test_a_failed_probe_leaves_the_session_on_polling(caplog):
    engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    sock = engine.sockets[sid]
    ws = FakeProtocol()
    sock.upgrading, sock.websocket = True, ws
    up = Upgrade(sock, ws)
    with caplog.at_level(logging.WARNING):
        up.on_message("x")
    assert "malformed engine.io packet" in caplog.text
    assert ws.closed_with == [(1000, "")] and not sock.upgrading and sock.websocket is None
    assert sock.transport is None and rec.closes == []
    sock.send("42[1]")
    assert (await request(app, "GET", f"EIO=4&transport=polling&sid={sid}"))[2] == b"42[1]"


async def test_pinger_rounds(monkeypatch):
    engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    sock = engine.sockets[sid]
    start = sock.connected_at
    engine.tick(start + 24)
    assert sock.pending == []
    engine.tick(start + 25)
    assert sock.take_pending() == ["2"]
    await request(app, "POST", f"EIO=4&transport=polling&sid={sid}", [b"3"])
    engine.tick(start + 24)
    assert sock.pending == []  # the next one a full interval after the PONG
    engine.connected = lambda s: True
    engine.tick(start + 26)
    assert sock.take_pending() == ["2"]
    engine.tick(start + 46.5)
    assert rec.closes == [(sid, "ping timeout")]


async def test_a_session_that_never_connects_is_closed():
    engine, app, rec = make()
    sid = (await handshake(app))["sid"]
    engine.connected = lambda s: False
    sock = engine.sockets[sid]
    sock.clock.due = float("inf")
    engine.tick(sock.connected_at + sockets_module.CONNECT_TIMEOUT_SECONDS + 1)
    assert rec.closes == [(sid, "forced close")]


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:5000"])
def test_same_origin_only_without_a_configured_origin(origin):
    cors = Cors(None)
    headers = {b"host": b"127.0.0.1:5000", **({b"origin": origin.encode()} if origin else {})}
    assert not cors.refuses(headers)
    assert cors.refuses({b"host": b"127.0.0.1:5000", b"origin": b"https://evil.test"})
    assert not cors.refuses({b"host": b"x", b"x-forwarded-host": b"a.test", b"origin": b"https://a.test"}, secure=True)
