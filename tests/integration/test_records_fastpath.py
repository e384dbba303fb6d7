"""The records websocket fast path as a real process: socket.io-client 4.8
over a websocket (direct or upgraded from long-polling) gets broadcasts
written straight to its transport, a polling client through the send queue,
and hostile websocket traffic gets RFC 6455 close codes while everyone else
carries on."""

from __future__ import annotations

import base64
import os
import socket
import struct

import pytest

from tests.integration.records_support import Rails, RawWebSocket, SioClients, start_records
from tests.support import masked as masked_frame
from tests.support import wait_for


@pytest.fixture(scope="module")
def service(redis_url):
    svc = start_records(redis_url)
    yield svc
    svc.stop()


def handshake(port: int, version: str = "13") -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def frame(first: int, payload: bytes, masked: bool = True) -> bytes:
    n = len(payload)
    if n < 126:
        length = bytes([n])
    elif n < 65536:
        length = bytes([126]) + struct.pack("!H", n)
    else:
        length = bytes([127]) + struct.pack("!Q", n)
    if not masked:
        return bytes([first]) + length + payload
    return masked_frame(first, payload)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the server sent (unmasked frames) into (opcode, payload)."""
    out, pos = [], 0
    while pos + 2 <= len(data):
        opcode, n, pos = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack("!H", data[pos:pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack("!Q", data[pos:pos + 8])[0], pos + 8
        out.append((opcode, data[pos:pos + n]))
        pos += n
    return out


def counter(svc, name: str) -> float:
    return svc.metrics().get(name, 0.0)


def test_websocket_and_upgraded_clients_get_the_fast_path_polling_the_queue(service, redis_url):
    rails = Rails(redis_url)
    clients = None
    try:
        rails.token("tok-fp", 7, [70])
        clients = SioClients(service.url, [
            {"name": "ws", "token": "tok-fp", "transports": ["websocket"]},
            {"name": "upgrade", "token": "tok-fp", "transports": ["polling", "websocket"]},
            {"name": "poll", "token": "tok-fp", "transports": ["polling"]},
        ])
        clients.wait_connected(["ws", "upgrade", "poll"])
        clients.wait(lambda _: clients.of("upgrade", "upgrade"), 10, "upgrade to websocket")
        direct = counter(service, "records_direct_deliveries_total")
        total = counter(service, "records_deliveries_total")
        for i in range(30):
            rails.records("group-70", {"n": i, "text": "é ✓ " * (i * 20)})  # 7-bit and 16-bit frame lengths
        for name in ("ws", "upgrade", "poll"):
            got = clients.wait_events(name, 30, "records")
            assert [a[0]["records"]["n"] for a in got] == list(range(30))
            assert got[-1][0]["records"]["text"] == "é ✓ " * 580
        assert counter(service, "records_deliveries_total") - total == 90
        # Both websocket clients, and only they, were written to directly.
        assert counter(service, "records_direct_deliveries_total") - direct == 60
    finally:
        if clients:
            clients.close()
        rails.close()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(0x81, b"40", masked=False), 1002),  # a client frame must be masked
        (frame(0x81, b"4\xc3\x28"), 1007),  # invalid UTF-8 text
        (frame(0x82, b"x" * 65600), 1009),  # over the packet size limit
        (frame(0xC1, b"40"), 1002),  # compressed without negotiating it
    ],
)
def test_hostile_frames_get_a_close_code_and_others_carry_on(service, redis_url, data, code):
    sock, head = handshake(service.port)
    try:
        assert b" 101 " in head
        sock.sendall(data)
        frames = server_frames(read_to_eof(sock))
        assert frames[0][0] == 0x1 and frames[0][1].startswith(b"0{")  # engine.io OPEN
        assert frames[-1][0] == 0x8 and frames[-1][1][:2] == struct.pack("!H", code), frames
    finally:
        sock.close()
    assert service.process.poll() is None
    assert "websocket protocol error from client" in service.logs()
    ok = RawWebSocket(service.port, "/socket.io/?EIO=4&transport=websocket")
    ok.close()


def test_bad_handshakes_are_refused_with_http_status(service):
    sock, head = handshake(service.port, version="8")
    try:
        assert head.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13" in head
    finally:
        sock.close()
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        sock.sendall(
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert read_to_eof(sock).startswith(b"HTTP/1.1 400 ")
    finally:
        sock.close()
    assert service.process.poll() is None


def test_ping_frames_are_answered_and_a_close_frame_is_echoed(service):
    sock, head = handshake(service.port)
    try:
        assert b" 101 " in head
        wait_for(lambda: sock.recv(4096).startswith(b"\x81"), 5, what="engine.io OPEN")
        sock.sendall(frame(0x89, b"hi"))
        got = b""
        while b"\x8a\x02hi" not in got:
            got += sock.recv(4096)
        sock.sendall(frame(0x88, struct.pack("!H", 1000) + b"bye"))
        assert server_frames(read_to_eof(sock))[-1] == (0x8, b"\x03\xe8")
    finally:
        sock.close()
