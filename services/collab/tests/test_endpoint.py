"""The service's websocket endpoint on the lean protocol, driven directly:
client frames in through data_received, server frames out of a recording
transport. Frames reach the socket's connection in the read callback; a
fault of ours closes that socket with 1011 and the service carries on."""

from __future__ import annotations

import asyncio
import gc
import logging
import types

import pytest
from channels_collab import protocol as p
from channels_collab.app import CollabService
from channels_collab.connection import Connection
from channels_common import wsframe
from channels_common.settings import CollabSettings
from channels_common.wsserver import LeanWebSocketProtocol

from tests.support import FakeTransport, masked

REQUEST = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
async def service():
    svc = CollabService(CollabSettings(PRIVATE_APP_URL="http://127.0.0.1:1"))
    await svc.start()
    yield svc
    await svc.stop()
    gc.unfreeze()  # start() froze this test process's objects


async def connect(svc):
    config = types.SimpleNamespace(loaded_app=svc.endpoint, root_path="", asgi_version="3.0", ws_max_size=1 << 20)
    state = types.SimpleNamespace(connections=set(), tasks=set(), default_headers=[])
    proto = LeanWebSocketProtocol(config, state, {})
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(REQUEST)
    for _ in range(10):
        await asyncio.sleep(0)
    assert transport.take().startswith(b"HTTP/1.1 101 ")
    assert not state.tasks  # detached: no task per socket
    return proto, transport


async def test_frames_are_answered_in_the_read_callback(service):
    proto, t = await connect(service)
    proto.data_received(masked(0x82, p.encode_token("not a document", "1,secret")))
    assert t.take() == wsframe.binary_frame(p.encode_permission_denied("not a document", "permission-denied"))
    assert len(service.sockets) == 1


async def test_a_text_frame_closes_with_1003_and_the_client_close_lets_go(service):
    proto, t = await connect(service)
    proto.data_received(masked(0x81, b"hello"))
    assert t.take() == wsframe.close_frame(1003, "Binary frames only") and not t.closed
    proto.data_received(masked(0x88, b"\x03\xeb"))
    assert t.closed and not service.sockets


async def test_a_fault_of_ours_closes_that_socket_with_1011_and_others_carry_on(service, monkeypatch, caplog):
    healthy, th = await connect(service)
    proto, t = await connect(service)
    original = Connection.receive

    def receive(self, frame):
        if frame == b"boom":
            raise RuntimeError("bug")
        original(self, frame)

    monkeypatch.setattr(Connection, "receive", receive)
    with caplog.at_level(logging.ERROR, logger="channels.collab"):
        proto.data_received(masked(0x82, b"boom"))
    assert t.take() == wsframe.close_frame(1011, "Internal Error")
    assert "frame handling failed" in caplog.text
    proto.connection_lost(None)
    assert len(service.sockets) == 1
    healthy.data_received(masked(0x82, p.encode_token("not a document", "1,secret")))
    assert th.take() == wsframe.binary_frame(p.encode_permission_denied("not a document", "permission-denied"))
