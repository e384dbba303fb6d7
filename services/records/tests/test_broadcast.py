"""The broadcast hot path with the real sessions and rooms (sockets.py) and
stand-in transports (the real server is exercised in tests/integration)."""

from __future__ import annotations

from channels_records.broadcast import Broadcaster
from channels_records.sockets import Engine, EngineSocket, Rooms

from tests.support import FakeTransport


def make_engine(n):
    engine = Engine()
    for i in range(n):
        engine.sockets[f"e{i}"] = EngineSocket(engine, f"e{i}", "", "polling")
    return engine


def make_rooms(rooms):
    r = Rooms()
    for room, members in rooms.items():
        for e in members:
            r.add(f"s-{e}", e)
            r.enter(f"s-{e}", room)
    return r


def make(rooms, n=3, limit=1000):
    engine = make_engine(n)
    evicted = []
    b = Broadcaster(engine, make_rooms(rooms), limit_bytes=limit, on_overflow=evicted.append)
    return engine, b, evicted


def drain(sock):
    return sock.take_pending()


def test_one_shared_packet_for_every_member_and_nobody_else():
    engine, b, _ = make({"group-1": ["e0", "e1"]})
    assert b.to_room("group-1", '2["records",{}]') == 2
    p0 = engine.sockets["e0"].pending[0]
    assert p0 is engine.sockets["e1"].pending[0]  # encoded once, shared
    assert drain(engine.sockets["e0"]) == ['42["records",{}]']
    assert drain(engine.sockets["e2"]) == []
    assert b.to_room("nobody", "2[]") == 0


def test_pending_bytes_are_counted_and_overflow_evicts_instead_of_queueing():
    engine, b, evicted = make({"g": ["e0", "e1"]}, limit=100)
    text = "2" + "x" * 39  # 41 bytes with the engine.io type
    b.to_room("g", text)
    b.to_room("g", text)
    assert engine.sockets["e0"].pending_bytes == 82
    drain(engine.sockets["e1"])  # e1 reads, e0 does not
    assert engine.sockets["e1"].pending_bytes == 0
    b.to_room("g", text)
    assert evicted == ["e0"]
    assert len(engine.sockets["e0"].pending) == 2
    assert len(engine.sockets["e1"].pending) == 1


def test_closed_sockets_are_skipped():
    engine, b, _ = make({"g": ["e0", "e1"]})
    engine.sockets["e0"].closing = True
    del engine.sockets["e1"]
    assert b.to_room("g", "2[]") == 0


def test_held_packets_follow_the_connect_reply_minus_replayed_offsets():
    engine, b, _ = make({"g": ["e0"]})
    b.hold("e0")
    b.to_room("g", '2["records",1,"1-0"]', "1-0")
    b.to_room("g", '2["records",2,"2-0"]', "2-0")
    b.to_room("g", '2["records",3]', None)
    assert engine.sockets["e0"].pending == []
    b.send_now("e0", '0{"sid":"s","pid":"p"}')
    b.send_now("e0", '2["records",1,"1-0"]')  # the replay carried offset 1-0
    b.release("e0", {"1-0"})
    assert drain(engine.sockets["e0"]) == [
        '40{"sid":"s","pid":"p"}',
        '42["records",1,"1-0"]',
        '42["records",2,"2-0"]',
        '42["records",3]',
    ]
    b.to_room("g", '2["records",4]')
    assert drain(engine.sockets["e0"]) == ['42["records",4]']


def test_floor_skips_live_copies_of_replayed_events_until_caught_up():
    engine = make_engine(1)
    b = Broadcaster(
        engine, make_rooms({"g": ["e0"]}), limit_bytes=1000, on_overflow=lambda e: None,
        order_key=lambda o: tuple(int(x) for x in o.split("-")),
    )
    b.set_floor("e0", "5-0")
    b.to_room("g", '2["records",4,"4-0"]', "4-0")
    b.to_room("g", '2["records",5,"5-0"]', "5-0")
    b.to_room("g", '2["records",6,"6-0"]', "6-0")
    b.to_room("g", '2["records",7,"7-0"]', "7-0")
    assert drain(engine.sockets["e0"]) == ['42["records",6,"6-0"]', '42["records",7,"7-0"]']
    assert b.floors == {}


def test_a_floor_with_the_replayed_offsets_skips_only_those():
    """Issue 25: a live copy at or below the floor that the replay did not
    carry (its offset belongs to another event) is sent, not lost."""
    engine = make_engine(1)
    b = Broadcaster(
        engine, make_rooms({"g": ["e0"]}), limit_bytes=1000, on_overflow=lambda e: None,
        order_key=lambda o: tuple(int(x) for x in o.split("-")),
    )
    b.set_floor("e0", "5-0", {"4-0", "5-0"})
    b.to_room("g", '2["records",4,"4-0"]', "4-0")
    b.to_room("g", '2["records",2,"2-0"]', "2-0")
    b.to_room("g", '2["records",5,"5-0"]', "5-0")
    b.to_room("g", '2["records",6,"6-0"]', "6-0")
    assert drain(engine.sockets["e0"]) == ['42["records",2,"2-0"]', '42["records",6,"6-0"]']
    assert b.floors == {} and b.floor_offsets == {}
    b.set_floor("e0", "9-0", {"9-0"})
    b.forget("e0")
    assert b.floors == {} and b.floor_offsets == {}


def on_websocket(sock):
    sock.go_direct(FakeTransport(reads=False))
    return sock.transport


def test_websocket_sockets_get_one_shared_frame_written_to_their_transport():
    engine, b, _ = make({"g": ["e0", "e1", "e2"]})
    t0 = on_websocket(engine.sockets["e0"])
    t1 = on_websocket(engine.sockets["e1"])
    assert b.to_room("g", '2["records",{"a":1}]') == 3
    payload = b'42["records",{"a":1}]'
    assert t0.writes == [bytes([0x81, len(payload)]) + payload]
    assert t0.writes[0] is t1.writes[0]  # framed once for everybody
    assert engine.sockets["e0"].pending == []
    assert drain(engine.sockets["e2"]) == ['42["records",{"a":1}]']  # polling: pending
    assert b.counters.direct == 2


def test_transport_buffer_past_the_limit_evicts_instead_of_writing():
    engine, b, evicted = make({"g": ["e0", "e1"]}, limit=100)
    t0 = on_websocket(engine.sockets["e0"])
    t1 = on_websocket(engine.sockets["e1"])
    text = "2" + "x" * 39  # a 42-byte frame
    b.to_room("g", text)
    b.to_room("g", text)
    t1.buffer.clear()  # e1 reads, e0 does not
    b.to_room("g", text)
    assert evicted == ["e0"]
    assert len(t0.writes) == 2 and len(t1.writes) == 3


def test_closing_transport_gets_nothing():
    engine, b, evicted = make({"g": ["e0"]})
    t = on_websocket(engine.sockets["e0"])
    t.closed = True
    assert b.to_room("g", "2[]") == 0 and t.writes == [] and not evicted


def test_connect_reply_and_held_events_reach_the_transport_in_order():
    engine, b, _ = make({"g": ["e0"]})
    t = on_websocket(engine.sockets["e0"])
    b.hold("e0")
    b.to_room("g", "2[1]")
    assert t.writes == []
    b.send_now("e0", '0{"sid":"s"}')
    b.release("e0")
    assert [w[2:] for w in t.writes] == [b'40{"sid":"s"}', b"42[1]"]


def test_routes_follow_room_changes_and_socket_state():
    """Which sockets a broadcast writes to directly is worked out once per
    room; every change that matters (joins, leaves, closing, the transport
    coming, handshakes, sessions going) must show in the next broadcast."""
    engine, rooms = make_engine(3), Rooms()
    evicted = []
    b = Broadcaster(engine, rooms, limit_bytes=1000, on_overflow=evicted.append)
    socks = {i: engine.sockets[f"e{i}"] for i in range(3)}
    for i in range(3):
        rooms.add(f"s{i}", f"e{i}")
    t = {i: on_websocket(socks[i]) for i in range(2)}
    rooms.enter("s0", "g")
    assert b.to_room("g", "2[1]") == 1 and len(t[0].writes) == 1
    rooms.enter("s1", "g")
    rooms.enter("s2", "g")
    assert b.to_room("g", "2[2]") == 3 and [len(t[i].writes) for i in range(2)] == [2, 1]
    assert socks[2].take_pending() == ["42[2]"]  # still polling
    rooms.leave("s0", "g")
    assert b.to_room("g", "2[3]") == 2 and len(t[0].writes) == 2
    socks[1].closing = True
    engine.routes_changed()
    assert b.to_room("g", "2[4]") == 1 and len(t[1].writes) == 2
    t[2] = on_websocket(socks[2])  # upgraded: what was pending goes first, then direct
    assert b.to_room("g", "2[5]") == 1 and socks[2].pending == []
    assert [w[2:] for w in t[2].writes] == [b"42[3]", b"42[4]", b"42[5]"]
    b.hold("e2")
    assert b.to_room("g", "2[6]") == 1 and len(t[2].writes) == 3  # held for its handshake
    b.release("e2")
    assert [w[2:] for w in t[2].writes[3:]] == [b"42[6]"]
    assert b.to_room("g", "2[7]") == 1 and len(t[2].writes) == 5
    engine.forget(socks[2])
    assert b.to_room("g", "2[8]") == 0 and len(t[2].writes) == 5
    rooms.remove("s2")
    assert rooms.members == {"g": {"s1": "e1"}} and "e2" not in rooms.sid_of
    assert evicted == []


# -- the raw descriptor path, over real loopback TCP connections -------------------

import asyncio
import socket

from channels_common.wsframe import text_frame
from channels_records.broadcast import raw_fd


async def tcp_pair():
    """A server-side transport on a real TCP connection, and the client's
    blocking socket (which reads only when the test says so)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small kernel buffers
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listener.close()
    accepted.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted)
    return transport, client


def read_all(client, until: int) -> bytes:
    client.settimeout(5)
    got = bytearray()
    while len(got) < until:
        got += client.recv(1 << 20)
    return bytes(got)


async def test_a_plain_tcp_transport_with_nothing_queued_is_written_through_its_descriptor():
    engine, b, _ = make({"g": ["e0"]})
    transport, client = await tcp_pair()
    try:
        engine.sockets["e0"].go_direct(transport)
        assert raw_fd(transport) >= 0
        payload = b'42["records",{"a":1}]'
        assert b.to_room("g", '2["records",{"a":1}]') == 1
        assert transport.get_write_buffer_size() == 0  # went straight to the kernel
        assert read_all(client, len(payload) + 2) == bytes([0x81, len(payload)]) + payload
        assert b.counters.direct == 1
    finally:
        transport.abort()
        client.close()


async def test_what_the_kernel_does_not_take_waits_in_the_transport_in_order():
    # The client does not read: the kernel's buffers fill, the rest of a
    # frame and every later frame queue in the transport, and once the
    # client reads, the bytes arrive whole and in publish order.
    engine, b, evicted = make({"g": ["e0"]}, limit=64 * 1024 * 1024)
    transport, client = await tcp_pair()
    try:
        engine.sockets["e0"].go_direct(transport)
        texts = [f'2["records",{{"n":{n},"pad":"{"x" * 60_000}"}}]' for n in range(60)]
        for text in texts:
            assert b.to_room("g", text) == 1
        assert transport.get_write_buffer_size() > 0  # some of it is queued
        expected = b"".join(text_frame(("4" + t).encode()) for t in texts)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, read_all, client, len(expected))
        assert got == expected and not evicted
    finally:
        transport.abort()
        client.close()


async def test_a_closing_transport_is_never_written_through_its_descriptor():
    engine, b, _ = make({"g": ["e0"]})
    transport, client = await tcp_pair()
    try:
        engine.sockets["e0"].go_direct(transport)
        b.to_room("g", "2[1]")  # builds the route with the descriptor
        transport.close()
        assert b.to_room("g", "2[2]") == 0
        await asyncio.sleep(0.05)
        client.settimeout(2)
        data = b""
        while chunk := client.recv(4096):
            data += chunk
        assert data == bytes([0x81, 5]) + b"42[1]"  # the first frame only
    finally:
        client.close()


def test_tls_and_foreign_transports_have_no_raw_descriptor():
    class Tls:
        def get_extra_info(self, name):
            return object() if name == "sslcontext" else None

    assert raw_fd(Tls()) == -1
    assert raw_fd(FakeTransport()) == -1


def test_a_floor_holds_while_events_come_out_of_offset_order():
    """Soak seed 24: a catch-up after a resubscription sent a newer event of
    another room to a socket just recovered; that took its floor as passed,
    and the live copy of an event its replay had carried went out again.
    While the relay says events are unordered, only the replayed offsets
    count, and the floor stays."""
    engine = make_engine(1)
    b = Broadcaster(
        engine, make_rooms({"g": ["e0"], "h": ["e0"]}), limit_bytes=1000, on_overflow=lambda e: None,
        order_key=lambda o: tuple(int(x) for x in o.split("-")),
    )
    b.set_floor("e0", "5-0", {"5-0"})
    b.unordered = True
    b.to_room("h", '2["records",7,"7-0"]', "7-0")  # the catch-up's, newer
    b.to_room("g", '2["records",5,"5-0"]', "5-0")  # the live copy of a replayed one
    assert drain(engine.sockets["e0"]) == ['42["records",7,"7-0"]']
    assert b.floors  # still held
    b.unordered = False  # the relay is past the catch-up
    b.to_room("g", '2["records",8,"8-0"]', "8-0")
    b.to_room("g", '2["records",5,"5-0"]', "5-0")  # once in order, a floor passed is gone
    assert drain(engine.sockets["e0"]) == ['42["records",8,"8-0"]', '42["records",5,"5-0"]']
    assert b.floors == {} and b.floor_offsets == {}
