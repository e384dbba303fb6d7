"""Our Engine.IO/Socket.IO core against the reference: the same inputs
through the reference parsers, and the same client scripts against our
service and against Node socket.io 4.8 (bench/reference/records.mjs):
socket.io-client 4.8 and python-socketio's AsyncClient on websocket only,
polling only and polling upgraded to websocket, every record once and in
order, across a network drop; a chunked POST from a raw HTTP client."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import socketio

from bench.processes import BENCH, Server, free_port
from tests.integration.records_support import APP_ORIGIN, Rails, SioClients, TcpProxy, start_records
from tests.support import NodeScript

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow

# -- the parsers ----------------------------------------------------------------

SOCKETIO_WIRES = [
    "", "0", "0{}", '0{"pid":"abc","offset":"1-0"}', "0/admin,{}", "0/admin", "1", '2["a"]', "2[1]",
    '212["a"]', '2/admin,7["x"]', "3[]", '4{"message":"x"}', '4"x"',
    "0null", "0[]", '0"x"', "0false", "0{not json", "1{}", "2[]", '2["connect"]', '2["disconnecting"]',
    "2[true]", "2[", '2["a",NaN]', "2{}", "3{}", "5-[]", "5x-[]", "7", "9[]", "x",
]
ENGINEIO_WIRES = ["", "x", "9", "7", "3", "2probe", "3probe", "40", "4", "1", "5", "6", "0", "bAQID", "4é ✓"]


def test_our_decoders_agree_with_the_reference_parsers():
    from channels_records import engineio as eio
    from channels_records import socketio as sio

    node = NodeScript("parsers.mjs", json.dumps({"socketio": SOCKETIO_WIRES, "engineio": ENGINEIO_WIRES}))
    try:
        reference = next(node.lines())
    finally:
        node.close()
    for wire, ref in zip(SOCKETIO_WIRES, reference["socketio"], strict=True):
        if "error" in ref:
            with pytest.raises(sio.SocketIOProtocolError) as err:
                sio.decode(wire)
            assert str(err.value) == ref["error"], wire
        else:
            ours = sio.decode(wire)
            packet = ref["ok"]
            assert (ours.type, ours.namespace, ours.id, ours.data) == (
                packet["type"], packet["nsp"], packet.get("id"), packet.get("data")
            ), wire
    names = {"open": eio.OPEN, "close": eio.CLOSE, "ping": eio.PING, "pong": eio.PONG,
             "message": eio.MESSAGE, "upgrade": eio.UPGRADE, "noop": eio.NOOP}
    for wire, ref in zip(ENGINEIO_WIRES, reference["engineio"], strict=True):
        if ref["type"] == "error":
            with pytest.raises(eio.EngineIOProtocolError):
                eio.decode_packet(wire)
            continue
        ours = eio.decode_packet(wire)
        assert ours.type == names[ref["type"]], wire
        expected = bytes(ref["binary"]) if "binary" in ref else ref.get("data", "")
        assert ours.data == expected, wire


# -- ours and the reference, the same scripts ------------------------------------


@pytest.fixture(scope="module", params=["ours", "node"])
def server(request, redis_url):
    if request.param == "ours":
        svc = start_records(redis_url)
        yield request.param, svc.port
        svc.stop()
        return
    env = {"REDIS_URL": redis_url, "PUBLIC_APP_URL": APP_ORIGIN}
    node = Server("reference", ["node", str(BENCH / "reference" / "records.mjs")], free_port(), env, cwd=BENCH)
    node.start()
    yield request.param, node.port
    node.stop()


@pytest.fixture
def rails(redis_url):
    r = Rails(redis_url)
    yield r
    r.close()


MATRIX = {"websocket": ["websocket"], "polling": ["polling"], "upgrade": ["polling", "websocket"]}


def seqs(clients, name):
    return [args[0]["records"]["seq"] for args in clients.events(name, "records")]


def test_socket_io_client_matrix_with_a_drop(server, rails):
    who, port = server
    proxy = TcpProxy(port)
    room = f"group-{hash(who) % 10000 + 30000}"
    group = int(room.split("-")[1])
    rails.token(f"tok-mx-{who}", 300, [group])
    clients = None
    try:
        clients = SioClients(
            f"http://127.0.0.1:{proxy.port}",
            [{"name": n, "token": f"tok-mx-{who}", "transports": t} for n, t in MATRIX.items()],
        )
        clients.wait_connected(list(MATRIX))
        clients.wait(lambda _: clients.of("upgrade", "upgrade"), 10, "upgrade to websocket")
        time.sleep(0.3)  # the reference joins rooms after its CONNECT reply
        for i in range(10):
            rails.records(room, {"seq": i})
        for name in MATRIX:
            clients.wait_events(name, 10, "records")
        proxy.outage()
        clients.wait(lambda _: all(clients.of(n, "disconnect") for n in MATRIX), 20, "drops")
        for i in range(10, 15):
            rails.records(room, {"seq": i})  # missed while away
        time.sleep(0.3)
        proxy.restore()
        clients.wait_connected(list(MATRIX), count=2, timeout=30)
        recovering = [n for n in MATRIX if who == "ours" or n != "polling"]
        for name in recovering:
            assert clients.of(name, "connect")[1]["recovered"] is True, (who, name)
            clients.wait_events(name, 15, "records")
        time.sleep(0.3)
        for i in range(15, 20):
            rails.records(room, {"seq": i})
        for name in recovering:
            clients.wait_events(name, 20, "records")
        time.sleep(0.3)
        for name in recovering:
            assert seqs(clients, name) == list(range(20)), (who, name)
        if who == "node":
            # The reference does not recover a polling client whose drop it
            # has not noticed yet (a cut between two polls): what it missed
            # is lost, though nothing comes twice or out of order.
            got = seqs(clients, "polling")
            assert got == sorted(set(got)) and got[:10] == list(range(10)) and got[-5:] == list(range(15, 20))
    finally:
        if clients:
            clients.close()
        proxy.close()


async def test_python_socketio_client_matrix_with_a_drop(server, rails):
    """python-socketio's client has no connection state recovery: after the
    drop it reconnects as a fresh session, and gets what follows."""
    who, port = server
    proxy = TcpProxy(port)
    room = f"group-{hash(who) % 10000 + 40000}"
    rails.token(f"tok-py-{who}", 301, [int(room.split("-")[1])])
    got = {name: [] for name in MATRIX}
    connects = {name: 0 for name in MATRIX}
    clients = {}
    try:
        for name, transports in MATRIX.items():
            client = socketio.AsyncClient(reconnection_delay=0.1, reconnection_delay_max=0.5, randomization_factor=0)
            client.on("records", lambda data, *rest, name=name: got[name].append(data["records"]["seq"]))
            client.on("connect", lambda name=name: connects.__setitem__(name, connects[name] + 1))
            await client.connect(f"http://127.0.0.1:{proxy.port}?channel_token=tok-py-{who}", transports=transports)
            clients[name] = client

        async def until(predicate, what, timeout=20.0):
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, f"{who}: timed out waiting for {what}: {got} {connects}"
                await asyncio.sleep(0.05)

        await until(lambda: clients["upgrade"].transport() == "websocket", "upgrade")
        await asyncio.sleep(0.3)
        for i in range(10):
            rails.records(room, {"seq": i})
        await until(lambda: all(len(v) == 10 for v in got.values()), "live records")
        proxy.cut()
        await until(lambda: all(n >= 2 for n in connects.values()), "reconnects")
        await asyncio.sleep(0.3)
        for i in range(10, 15):
            rails.records(room, {"seq": i})
        await until(lambda: all(len(v) == 15 for v in got.values()), "records after the drop")
        await asyncio.sleep(0.3)
        for name in MATRIX:
            assert got[name] == list(range(15)), (who, name)
    finally:
        for client in clients.values():
            await client.disconnect()
        proxy.close()


def http(port: int, request: bytes) -> tuple[int, bytes]:
    """One request on its own connection; the response's status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                    None,
                )
                if length is not None and len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_a_chunked_post_is_read_whole(server, rails):
    """As a proxy that streams request bodies sends it: the CONNECT packet in
    a `Transfer-Encoding: chunked` body, split across chunks."""
    who, port = server
    rails.token(f"tok-ch-{who}", 302, [50302])
    path = f"/socket.io/?EIO=4&transport=polling&channel_token=tok-ch-{who}"
    status, body = http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200 and body.startswith(b"0{")
    sid = json.loads(body[1:])["sid"]
    chunks = b"1\r\n4\r\n1\r\n0\r\n0\r\n\r\n"  # "40" in two chunks
    status, body = http(
        port,
        f"POST {path}&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain;charset=UTF-8\r\n"
        f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode() + chunks,
    )
    assert (status, body) == (200, b"ok")
    status, body = http(port, f"GET {path}&sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200 and body.startswith(b'40{"sid":'), body
    time.sleep(0.3)  # the reference joins rooms after its CONNECT reply
    rails.records("group-50302", {"seq": 1})
    status, body = http(port, f"GET {path}&sid={sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200 and body.startswith(b"42"), body
    event = json.loads(body[2:])
    assert event[:2] == ["records", {"room": "group-50302", "records": {"seq": 1}}]
    assert isinstance(event[2], str)  # the recovery offset
