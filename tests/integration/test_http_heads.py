"""Request heads against the real records and collab processes, over real
sockets: a client that drips its head is closed at HTTP_HEAD_TIMEOUT_SECONDS
(here 1 s), one that is merely slow but finishes in time is served, and past
HTTP_MAX_PENDING_HEADS the connection that has waited longest is closed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.integration.collab_helpers import start_collab
from tests.integration.records_support import start_records
from tests.support import wait_for

pytestmark = pytest.mark.slow

HEAD = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: slow\r\nAccept: */*\r\n\r\n"


@pytest.fixture(scope="module", params=["records", "collab"])
def service(request, redis_url):
    env = {"HTTP_HEAD_TIMEOUT_SECONDS": "1", "HTTP_MAX_PENDING_HEADS": "4"}
    if request.param == "records":
        started = start_records(redis_url, **env)
    else:
        started = start_collab(None, redis_url, COLLAB_REDIS_PREFIX="t-heads:", **env)
        started.wait_http("/healthz")
    started.kind = request.param
    yield started
    started.stop()


def connect(service) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (or `timeout`)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        return out + b"<still open>"
    except ConnectionResetError:
        pass
    return out


def closed_count(service, cause: str) -> float:
    return service.metrics().get(f'{service.kind}_http_heads_closed_total{{cause="{cause}"}}', 0.0)


def test_a_drip_fed_head_is_closed_at_the_deadline(service):
    before = closed_count(service, "deadline")
    sock = connect(service)
    stop = threading.Event()

    def drip():
        # A header byte every 0.2 s, never the blank line that ends the head.
        for byte in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000):
            if stop.wait(0.2):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        answer = read_all(sock, timeout=15)
    finally:
        stop.set()
        dripper.join()
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert closed_count(service, "deadline") == before + 1, [
        (k, v) for k, v in service.metrics().items() if "head" in k] or service.logs()[-3000:]


def test_a_silent_connection_is_closed_too(service):
    sock = connect(service)
    try:
        answer = read_all(sock, timeout=15)
    finally:
        sock.close()
    assert b"<still open>" not in answer


def test_a_slow_head_finished_in_time_is_served(service):
    sock = connect(service)
    try:
        for i in range(0, len(HEAD), 20):  # in pieces over about half the deadline
            sock.sendall(HEAD[i:i + 20])
            time.sleep(0.1)
        answer = read_all(sock, timeout=3)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]


def test_past_the_bound_the_longest_waiting_head_is_closed(service):
    before = closed_count(service, "bound")
    socks = []
    try:
        for _ in range(6):
            sock = connect(service)
            sock.sendall(HEAD[:30])  # a head begun, not finished
            socks.append(sock)
            time.sleep(0.05)
        # The bound is 4: the two that waited longest are closed at once...
        for sock in socks[:2]:
            assert read_all(sock, timeout=0.9).startswith(b"HTTP/1.1 408 ")
        # ...the other four are still there and served when they finish.
        for sock in socks[2:]:
            sock.sendall(HEAD[30:])
        for sock in socks[2:]:
            sock.settimeout(3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in socks:
            sock.close()
    assert closed_count(service, "bound") == before + 2
    wait_for(lambda: "too many connections in their request head" in service.logs(), 5, what="the bound's log line")
