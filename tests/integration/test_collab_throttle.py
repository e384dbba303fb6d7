"""Connection-attempt throttling of the collab service as a real process:
raw upgrade requests (for X-Forwarded-For and the 429 response) and the
real @hocuspocus/provider, with and without a trusted proxy, and off by
default."""

from __future__ import annotations

import base64
import itertools
import os
import random
import socket
import time

import pytest

from tests.integration.collab_helpers import Provider, start_collab, token

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow

# Keys of its own in the session's Redis: no draft of another module's documents.
PREFIX = "t-throttle:"
_ids = itertools.count(random.Random(__name__).randint(1000, 9000) * 1000)  # seeded: reruns see the same names
THROTTLED = "collab_throttled_total"


@pytest.fixture
def services(redis_url):
    started = []

    def start(rails_url: str, **env):
        service = start_collab(rails_url, redis_url, COLLAB_REDIS_PREFIX=PREFIX, **env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def attempt(port: int, forwarded_for: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One WebSocket upgrade request: (status, headers, body). A 101 is
    closed at once; a refusal is read to its end (the server closes)."""
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
    )
    if forwarded_for is not None:
        request += b"X-Forwarded-For: " + forwarded_for.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines)}
        if status != 101:
            while chunk := sock.recv(4096):
                body += chunk
    return status, headers, body


def statuses(port: int, count: int, forwarded_for: str | None = None) -> list[int]:
    return [attempt(port, forwarded_for)[0] for _ in range(count)]


def throttled(service) -> float:
    return service.metrics().get(THROTTLED, 0.0)


def sync_one(version: str, ws_url: str) -> None:
    provider = Provider(version, ws_url)
    try:
        name = f"comment-{next(_ids)}-body"
        provider.attach(name, token("1"))
        provider.synced(name)
    finally:
        provider.close()


@pytest.mark.slow
def test_attempts_past_the_limit_get_429_until_the_ban_passes_then_providers_sync(rails, services):
    collab = services(rails.url, COLLAB_THROTTLE_ATTEMPTS="4", COLLAB_THROTTLE_WINDOW_SECONDS="60",
                      COLLAB_THROTTLE_BAN_SECONDS="1.5")
    assert statuses(collab.port, 4) == [101] * 4
    status, headers, body = attempt(collab.port)
    assert status == 429 and headers["retry-after"] == "2" and body == b"Too many connection attempts"
    assert headers["connection"] == "close"
    # Refused attempts during the ban are refused too, and do not extend it.
    status, headers, _ = attempt(collab.port)
    assert status == 429 and headers["retry-after"] in ("1", "2")
    assert throttled(collab) == 2
    banned = [line for line in collab.logs().splitlines() if "client banned" in line]
    assert len(banned) == 1 and "127.0.0.1" in banned[0]

    time.sleep(2)  # the Retry-After of the ban's first refusal, rounded up: the ban is over
    assert attempt(collab.port)[0] == 101
    ws_url = f"ws://127.0.0.1:{collab.port}"
    for version in ("v3", "v4"):
        sync_one(version, ws_url)
    assert throttled(collab) == 2


def test_a_trusted_proxy_has_its_forwarded_clients_counted_apart(rails, services):
    collab = services(rails.url, COLLAB_THROTTLE_ATTEMPTS="3", COLLAB_THROTTLE_BAN_SECONDS="60",
                      TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1")
    port = collab.port
    assert statuses(port, 4, "198.51.100.1") == [101, 101, 101, 429]
    # Another client behind the same proxy, over IPv4 and IPv6, is not held up.
    assert statuses(port, 2, "198.51.100.2") == [101, 101]
    assert statuses(port, 3, "2001:db8::1") == [101, 101, 101]
    assert attempt(port, "2001:db8:0::1")[0] == 429  # the same address, written otherwise
    # What a client writes left of the hop the proxy appended is not believed...
    assert attempt(port, "203.0.113.9, 198.51.100.1")[0] == 429
    # ...and a chain of trusted proxies is walked through to the client.
    assert attempt(port, "198.51.100.1, 10.1.1.1")[0] == 429
    # Garbage in the header stops the walk at the proxy: the proxy's own address.
    assert attempt(port, "not-an-address")[0] == 101
    # The proxy's own connections (no header) are counted on the proxy's address.
    sync_one("v4", f"ws://127.0.0.1:{port}")
    assert throttled(collab) == 4
    banned = [line for line in collab.logs().splitlines() if "client banned" in line]
    assert len(banned) == 2 and "198.51.100.1" in banned[0] and "2001:db8::1" in banned[1]


def test_without_trust_x_forwarded_for_is_ignored(rails, services):
    # The peer (127.0.0.1) is not among the trusted proxies: its header counts for nothing.
    collab = services(rails.url, COLLAB_THROTTLE_ATTEMPTS="2", COLLAB_THROTTLE_BAN_SECONDS="60",
                      TRUSTED_PROXIES="10.0.0.0/8")
    port = collab.port
    assert [attempt(port, f"198.51.100.{i}")[0] for i in range(1, 5)] == [101, 101, 429, 429]
    assert attempt(port)[0] == 429
    banned = [line for line in collab.logs().splitlines() if "client banned" in line]
    assert len(banned) == 1 and "127.0.0.1" in banned[0]
    assert throttled(collab) == 3


def test_throttling_is_off_by_default(rails, services):
    collab = services(rails.url)
    assert statuses(collab.port, 40) == [101] * 40
    sync_one("v3", f"ws://127.0.0.1:{collab.port}")
    assert throttled(collab) == 0
