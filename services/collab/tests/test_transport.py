"""The socket transport: frames straight onto the connection, a client that
does not read is closed once its backlog passes the bound."""

import asyncio

from channels_collab import app as collab_app
from channels_collab.app import SocketTransport
from channels_common import wsframe

from tests.support import FakeProtocol, FakeTransport


async def test_frames_are_framed_in_order_and_nothing_follows_a_close():
    proto = FakeProtocol(FakeTransport(reads=False))  # a client that reads nothing
    t = SocketTransport(proto, on_overflow=lambda: None)
    t.send(b"\x01")
    t.send(b"\x02\x03")
    assert bytes(proto.transport.out) == wsframe.binary_frame(b"\x01") + wsframe.binary_frame(b"\x02\x03")
    t.close(4408, "Connection Timeout")
    t.send(b"\x04")
    assert proto.closed_with == [(4408, "Connection Timeout")]
    assert bytes(proto.transport.out).endswith(wsframe.binary_frame(b"\x02\x03"))


async def test_a_client_that_does_not_read_is_dropped_past_the_bound(monkeypatch):
    monkeypatch.setattr(collab_app, "MAX_CLIENT_BUFFER_BYTES", 1000)
    overflowed = []
    proto = FakeProtocol(FakeTransport(reads=False))  # a client that reads nothing
    t = SocketTransport(proto, on_overflow=lambda: overflowed.append(True))
    for _ in range(9):
        t.send(b"x" * 100)
    await asyncio.sleep(0)
    assert not overflowed
    t.send(b"x" * 100)
    assert not overflowed  # never from inside the sender's loop
    await asyncio.sleep(0)
    assert overflowed == [True]
    size = len(proto.transport.out)
    t.send(b"y")
    assert len(proto.transport.out) == size


async def test_a_transport_already_closing_takes_nothing():
    proto = FakeProtocol(FakeTransport(reads=False))  # a client that reads nothing
    proto.transport.closed = True
    t = SocketTransport(proto, on_overflow=lambda: None)
    t.send(b"\x01")
    t.close(1000, "")
    assert proto.transport.out == b"" and proto.closed_with == []
