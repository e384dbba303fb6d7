"""Our uvicorn websocket protocol driven directly: bytes in through
data_received, bytes out of a recording transport, a small ASGI app."""

from __future__ import annotations

import asyncio
import types

from channels_common import wsframe
from channels_common.wsserver import MAX_INBOX, LeanWebSocketProtocol

from tests.support import FakeTransport, masked, settle, until

REQUEST = (
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def make(app):
    config = types.SimpleNamespace(loaded_app=app, root_path="", asgi_version="3.0", ws_max_size=1000)
    state = types.SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
    proto = LeanWebSocketProtocol(config, state, {})
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport, state


async def test_echo_app_handshake_messages_ping_and_close():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                seen.append(event)
                return
            await send({"type": "websocket.send", "text": event["text"].upper()})

    proto, t, state = make(app)
    proto.data_received(REQUEST)
    await settle()
    assert seen[0]["path"] == "/socket.io/" and seen[0]["query_string"] == b"EIO=4&transport=websocket"
    assert seen[0]["client"] == ("127.0.0.1", 5555)
    assert t.take().startswith(b"HTTP/1.1 101 ") and proto.transport is t
    proto.data_received(masked(0x81, b"hello") + masked(0x89, b"p"))
    await settle()
    assert t.take() == wsframe.pong_frame(b"p") + b"\x81\x05HELLO"  # the pong needs no app
    proto.data_received(masked(0x88, b"\x03\xe8"))
    await settle()
    assert t.take() == wsframe.close_frame(1000) and t.closed
    assert seen[-1]["code"] == 1000
    proto.connection_lost(None)
    assert not state.connections and not state.tasks


async def test_app_closing_before_accept_is_a_403_and_protocol_errors_a_close_code():
    async def refuse(scope, receive, send):
        await send({"type": "websocket.close"})

    proto, t, _ = make(refuse)
    proto.data_received(REQUEST)
    await settle()
    assert t.take().startswith(b"HTTP/1.1 403 ") and t.closed

    disconnects = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        disconnects.append(await receive())

    proto, t, _ = make(app)
    proto.data_received(REQUEST)
    await settle()
    t.take()
    proto.data_received(bytes([0x81, 0x02]) + b"hi")  # unmasked
    await settle()
    assert t.take() == wsframe.close_frame(1002, "unmasked client frame") and t.closed
    assert disconnects == [{"type": "websocket.disconnect", "code": 1002, "reason": ""}]


async def test_app_denies_the_upgrade_with_its_own_http_response():
    from channels_common.wsserver import HTTP_RESPONSE

    heard = []

    async def deny(scope, receive, send):
        assert HTTP_RESPONSE in scope["extensions"]
        await receive()
        await send({"type": "websocket.http.response.start", "status": 429,
                    "headers": [(b"retry-after", b"7"), (b"x-bad", b"1\r\nInjected: yes"), (b"connection", b"keep-alive")]})
        await send({"type": "websocket.http.response.body", "body": b"slow ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"down"})
        heard.append(await receive())

    proto, t, state = make(deny)
    state.default_headers = [(b"server", b"lean")]
    proto.data_received(REQUEST)
    await settle()
    assert t.take() == (b"HTTP/1.1 429 Too Many Requests\r\nserver: lean\r\nretry-after: 7\r\n"
                        b"Connection: close\r\n\r\nslow down")
    assert t.closed and not state.tasks
    assert heard == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]
    proto.data_received(masked(0x81, b"late"))  # nothing is parsed after a denial
    proto.connection_lost(None)
    assert t.take() == b"" and not state.connections


async def test_a_denial_cut_short_by_the_app_still_closes_the_connection():
    async def deny(scope, receive, send):
        await receive()
        await send({"type": "websocket.http.response.start", "status": 503, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"part", "more_body": True})

    proto, t, _ = make(deny)
    proto.data_received(REQUEST)
    await settle()
    assert t.take() == b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\npart" and t.closed


async def test_reading_pauses_when_the_app_falls_behind_and_server_close_times_out():
    got = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await got.wait()
        for _ in range(MAX_INBOX):
            await receive()
        await send({"type": "websocket.close", "code": 1001})
        await asyncio.sleep(0.2)

    proto, t, _ = make(app)
    proto.data_received(REQUEST)
    await settle()
    proto.data_received(b"".join(masked(0x81, b"m") for _ in range(MAX_INBOX)))
    assert t.paused
    got.set()
    await settle()
    assert not t.paused
    assert t.take().endswith(wsframe.close_frame(1001))
    proto._close_timer._run()  # the client never answered the close frame
    assert t.aborted


async def test_bad_upgrade_request_is_refused_without_running_the_app():
    async def app(scope, receive, send):
        raise AssertionError("must not run")

    proto, t, state = make(app)
    proto.data_received(REQUEST.replace(b"Version: 13", b"Version: 7"))
    assert t.take().startswith(b"HTTP/1.1 426 ") and t.closed and not state.tasks


async def test_a_handshake_read_a_byte_at_a_time_is_found_and_an_endless_one_refused():
    scopes = []

    async def app(scope, receive, send):
        scopes.append(scope)
        await receive()
        await send({"type": "websocket.accept"})

    proto, t, _ = make(app)
    for i in range(len(REQUEST)):
        proto.data_received(REQUEST[i:i + 1])
    await settle()
    assert t.take().startswith(b"HTTP/1.1 101 ") and scopes[0]["query_string"] == b"EIO=4&transport=websocket"
    proto, t, state = make(app)
    proto.data_received(REQUEST[:-4])
    for _ in range(20):
        proto.data_received(b"X-Pad: " + b"p" * 1000 + b"\r\n")  # never ends, past 16 KiB
    assert t.take().startswith(b"HTTP/1.1 400 ") and t.closed and len(scopes) == 1 and not state.tasks


async def detached_connection():
    """An accepted connection whose app handed it to callbacks and returned;
    the scope offered the hand-over."""
    from channels_common.wsserver import DETACH

    got, closed, offered = [], [], []

    async def app(scope, receive, send):
        offered.append(DETACH in scope["extensions"])
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": DETACH, "on_message": got.append, "on_close": closed.append})

    proto, t, state = make(app)
    proto.data_received(REQUEST)
    await settle()
    t.take()
    assert offered == [True]
    return proto, t, state, got, closed


async def test_a_detached_app_is_served_by_callbacks_without_its_task():
    proto, t, state, got, closed = await detached_connection()
    assert not state.tasks and not t.closed  # the app returned, the connection stays
    proto.data_received(masked(0x81, b"2probe") + masked(0x82, b"\x01") + masked(0x89, b""))
    assert got == ["2probe", b"\x01"] and t.take() == wsframe.pong_frame(b"")
    await proto.send({"type": "websocket.send", "text": "3"})
    assert t.take() == b"\x81\x013"
    proto.connection_lost(None)
    assert closed == [1006]
    proto.data_received(masked(0x81, b"late"))
    assert got == ["2probe", b"\x01"]


async def test_a_detached_app_closes_by_the_protocol_and_still_hears_the_end():
    proto, t, state, got, closed = await detached_connection()
    proto.close(4408, "Connection Timeout")
    assert t.take() == wsframe.close_frame(4408, "Connection Timeout") and not t.closed
    proto.close(4205, "again")  # once only
    # Data after our close frame is dropped; the client's close ends it, unechoed.
    proto.data_received(masked(0x82, b"\x01") + masked(0x88, b"\x0f\xf8"))
    assert got == [] and t.take() == b"" and t.closed
    assert closed == [4088]
    proto.connection_lost(None)
    assert closed == [4088] and not state.connections


async def test_reading_pauses_until_every_reason_is_resumed_and_a_close_reads_again():
    proto, t, _state, _got, _closed = await detached_connection()
    proto.pause_reading("auth")
    proto.pause_reading("unacked")
    proto.pause_reading("auth")  # twice for one reason is once
    assert t.paused
    proto.resume_reading("auth")
    assert t.paused  # "unacked" still holds it
    proto.resume_reading("unacked")
    assert not t.paused
    proto.resume_reading("never-paused")  # harmless
    assert not t.paused
    proto.pause_reading("auth")
    proto.close(4205, "Reset Connection")
    assert not t.paused  # the client's close frame must still be read
    proto.pause_reading("auth")
    assert not t.paused


async def test_keepalive_pings_a_quiet_socket_keeps_one_that_answers_and_finds_a_dead_one():
    from channels_common.wsserver import PING_FRAME, KeepAlive

    keepalive = KeepAlive(period=30)
    proto, t, _state, _got, _closed = await detached_connection()
    assert not keepalive.dead(proto, 100)  # first sight: quiet from now
    assert not keepalive.dead(proto, 114)
    assert t.take() == b""
    assert not keepalive.dead(proto, 115)  # quiet for half the period: pinged
    assert t.take() == PING_FRAME
    assert not keepalive.dead(proto, 120)
    assert t.take() == b""  # one ping per quiet stretch
    proto.data_received(masked(0x8A, b""))  # the pong
    for now in range(121, 400, 5):  # a live client answering every ping is never dead
        assert not keepalive.dead(proto, now)
        if t.take() == PING_FRAME:
            proto.data_received(masked(0x8A, b""))
    # Now it stops answering: dead one period after the unanswered ping.
    assert not keepalive.dead(proto, 400)
    assert not keepalive.dead(proto, 415)
    assert t.take() == PING_FRAME
    assert not keepalive.dead(proto, 444)
    assert keepalive.dead(proto, 445)


async def test_keepalive_does_not_count_time_we_held_reading_paused():
    from channels_common.wsserver import PING_FRAME, KeepAlive

    keepalive = KeepAlive(period=30)
    proto, t, _state, _got, _closed = await detached_connection()
    keepalive.dead(proto, 0)
    assert not keepalive.dead(proto, 15) and t.take() == PING_FRAME
    proto.pause_reading("auth")  # its pong may be sitting unread in the socket
    assert not keepalive.dead(proto, 100)
    proto.resume_reading("auth")
    assert not keepalive.dead(proto, 110)  # quiet counts from the resume
    assert t.take() == b""
    assert not keepalive.dead(proto, 116) and t.take() == PING_FRAME
    assert keepalive.dead(proto, 146)


async def test_a_head_over_the_limit_is_refused_even_when_it_arrives_in_one_read():
    # In pieces it was refused; in one read, parsed and served.
    from channels_common.wshandshake import MAX_REQUEST_BYTES

    async def app(scope, receive, send):
        raise AssertionError("served")

    head = REQUEST[:-2] + b"X-Padding: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n"
    proto, t, _ = make(app)
    proto.data_received(head)
    assert t.take().startswith(b"HTTP/1.1 400 ") and t.closed and proto.scope is None


class _PausedPeer(asyncio.Protocol):
    """A real socket whose reading is paused after the first bytes, as a
    socket held back for its pending auths is."""

    def __init__(self, lost: list):
        self.lost = lost
        self.read_paused = False
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.pause_reading()
        self.read_paused = True

    def connection_lost(self, exc):
        self.lost.append(self)


async def test_a_peer_that_hangs_up_while_reading_is_paused_is_noticed_and_aborted():
    import socket
    import struct

    from channels_common.wsserver import abort_hung_up

    lost: list = []
    peers: list[_PausedPeer] = []

    def factory():
        peers.append(_PausedPeer(lost))
        return peers[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for client in clients:
        client.sendall(b"x" * 1000)
    await until(lambda: len(peers) == 3 and all(p.read_paused for p in peers), 5)
    # More bytes wait unread, then the peer leaves: an RST, a FIN; the third stays.
    clients[0].sendall(b"y" * 1000)
    clients[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    clients[0].close()
    clients[1].sendall(b"y" * 1000)
    clients[1].close()
    await asyncio.sleep(0.1)
    assert lost == []  # paused: the transport itself hears nothing
    by_port = {p.transport.get_extra_info("peername")[1]: p for p in peers}
    assert abort_hung_up(peers) == 2
    await until(lambda: len(lost) == 2, 5)
    assert by_port[clients[2].getsockname()[1]] not in lost
    assert abort_hung_up(peers) == 0  # the one still there is left alone
    clients[2].close()
    server.close()
