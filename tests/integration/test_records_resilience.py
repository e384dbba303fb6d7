"""The records service when things go wrong: a slow or absent Redis,
SIGTERM, a client that stops reading, many clients at once."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
import redis as redis_sync

from tests.integration.records_support import Rails, RawWebSocket, SioClients, TcpProxy, start_records
from tests.support import ServiceProcess, wait_for

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def payloads(clients, name, event="records"):
    return [args[0] for args in clients.events(name, event)]


def test_event_published_at_the_instant_of_connect(redis_url):
    """Rooms are joined before the client sees `connect`. Token lookups go
    through a Redis that answers 100 ms late each way, so a server that
    joined after replying (as the original did) would miss this event."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port, delay=0.1)
    svc = start_records(f"redis://127.0.0.1:{proxy.port}/0")
    rails = Rails(redis_url)
    clients = None
    try:
        rails.token("tok-instant", 21, [210])
        clients = SioClients(svc.url, [{"name": "a", "token": "tok-instant", "transports": ["websocket"]}])
        clients.wait_connected(["a"])
        rails.records("user-21", {"at": "connect"})
        got = clients.wait_events("a", 1, "records")
        assert got[0][0] == {"room": "user-21", "records": {"at": "connect"}}
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()
        proxy.close()


def test_redis_killed_and_restarted_with_clients_connected_and_connecting(private_redis):
    svc = start_records(private_redis.url)
    rails = Rails(private_redis.url)
    clients = None
    try:
        rails.token("tok-before", 31, [310])
        rails.token("tok-during", 32, [310])
        clients = SioClients(svc.url, [
            {"name": "ws", "token": "tok-before", "transports": ["websocket"]},
            {"name": "poll", "token": "tok-before", "transports": ["polling"]},
        ])
        clients.wait_connected(["ws", "poll"])
        rails.records("group-310", {"n": 1})
        clients.wait_events("ws", 1)
        clients.wait_events("poll", 1)

        # A snapshot, as a production Redis with persistence would have; the
        # restarted server loads it (the tokens Rails wrote survive).
        rails.r.save()
        private_redis.kill()
        wait_for(lambda: httpx.get(svc.url + "/readyz").status_code == 503, 15, what="not ready")
        # A client connecting during the outage is let in (notices only for now).
        clients.send(cmd="add", client={"name": "late", "token": "tok-during"})
        clients.wait_connected(["late"])
        time.sleep(1.0)

        private_redis.start()
        svc.wait_http("/readyz", 20)

        # The late client ends up in its rooms in the background.
        def all_receive():
            rails.records("group-310", {"probe": True})
            time.sleep(0.3)
            return all(any(p["records"].get("probe") for p in payloads(clients, n)) for n in ["ws", "poll", "late"])

        wait_for(all_receive, 30, interval=0.2, what="delivery after redis came back")
        for name in ["ws", "poll", "late"]:
            assert clients.of(name, "disconnect") == [], f"{name} was disconnected"
        logs = svc.logs()
        assert "redis subscription lost" in logs or "redis subscription cannot connect" in logs
        assert svc.process.poll() is None
        assert svc.metrics()["records_redis_reconnects_total"] >= 1
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()


def test_sigterm_closes_sockets_so_clients_reconnect(redis_url):
    svc = start_records(redis_url)
    rails = Rails(redis_url)
    clients = None
    try:
        rails.token("tok-term", 41, [410])
        clients = SioClients(svc.url, [
            {"name": "ws", "token": "tok-term", "transports": ["websocket"]},
            {"name": "poll", "token": "tok-term", "transports": ["polling"]},
        ])
        clients.wait_connected(["ws", "poll"])
        started = time.monotonic()
        svc.signal(signal.SIGTERM)
        code = svc.process.wait(15)
        elapsed = time.monotonic() - started
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert code in (0, -signal.SIGTERM), svc.logs()[-2000:]
        assert "Application shutdown complete" in svc.logs()
        clients.wait(lambda _: clients.of("ws", "disconnect") and clients.of("poll", "disconnect"), 10, "disconnects")
        for name in ["ws", "poll"]:
            # Not "io server disconnect": that reason would stop the client from reconnecting.
            assert clients.of(name, "disconnect")[0]["reason"] in ("transport close", "transport error")
        print(f"SIGTERM to exit: {elapsed:.2f}s")
        # The next instance on the same address gets them back by themselves.
        svc2 = ServiceProcess("channels-records", svc.port, svc.env).start(ready=True)
        try:
            clients.wait_connected(["ws", "poll"], count=2)
            rails.records("group-410", {"after": "restart"})
            clients.wait_events("ws", 1)
            clients.wait_events("poll", 1)
        finally:
            svc2.stop()
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()


def test_client_that_stops_reading_is_disconnected(redis_url):
    limit = 256 * 1024
    svc = start_records(redis_url, MAX_CLIENT_BUFFER_BYTES=limit)
    rails = Rails(redis_url)
    clients = None
    raw = None
    try:
        rails.token("tok-slow", 51, [510])
        raw = RawWebSocket(svc.port, "/socket.io/?EIO=4&transport=websocket&channel_token=tok-slow")
        raw.send_text("40")
        clients = SioClients(svc.url, [{"name": "ok", "token": "tok-slow", "transports": ["websocket"]}])
        clients.wait_connected(["ok"])
        wait_for(lambda: svc.metrics()["records_connected_sockets"] == 2, 10, what="both connected")
        blob = "x" * 32 * 1024
        total = 400  # ~13 MB: more than every kernel and transport buffer on the way
        for i in range(total):
            rails.records("group-510", {"n": i, "blob": blob})
        got = clients.wait_events("ok", total, timeout=60)
        assert [a[0]["records"]["n"] for a in got] == list(range(total))
        wait_for(lambda: svc.metrics()["records_slow_client_disconnects_total"] >= 1, 20, what="eviction")
        assert raw.drain_until_eof(20), "the server kept the stuck connection open"
        assert "client not reading, disconnecting" in svc.logs()
        assert svc.metrics()["records_connected_sockets"] == 1
        assert svc.process.poll() is None
    finally:
        if raw:
            raw.close()
        if clients:
            clients.close()
        svc.stop()
        rails.close()


@pytest.mark.slow
def test_500_concurrent_clients_each_get_exactly_their_rooms(redis_url):
    svc = start_records(redis_url)
    r = redis_sync.Redis.from_url(redis_url)
    rails = Rails(redis_url)
    clients = None
    n, groups = 500, 25
    try:
        pipe = r.pipeline()
        for i in range(n):
            pipe.set(f"/current_users/tok500-{i}", f'{{"id": {1000 + i}, "group_ids": [{5000 + i % groups}]}}')
        pipe.execute()
        specs = [
            {"name": f"c{i}", "token": f"tok500-{i}", "transports": ["polling"] if i % 10 == 0 else ["websocket"]}
            for i in range(n)
        ]
        clients = SioClients(svc.url, specs)
        clients.wait_connected([s["name"] for s in specs], timeout=60)
        for i in range(n):
            rails.records(f"user-{1000 + i}", {"for": i})
        for g in range(groups):
            rails.records(f"group-{5000 + g}", {"group": g})
        rails.notice({"all": True})
        clients.wait(lambda _: clients.count("event") >= 3 * n, 60, "all deliveries")
        time.sleep(0.5)
        for i in range(n):
            got = payloads(clients, f"c{i}")
            assert sorted(map(str, got)) == sorted(map(str, [
                {"room": f"user-{1000 + i}", "records": {"for": i}},
                {"room": f"group-{5000 + i % groups}", "records": {"group": i % groups}},
            ])), f"client {i}: {got}"
            assert payloads(clients, f"c{i}", "notice") == [{"all": True}]
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()
        r.close()


@pytest.mark.slow
def test_connection_storm_of_2000_clients(redis_url):
    """2,000 clients connecting at once (a deploy, a network blip) all end up
    connected and in their rooms: token lookups queue for the bounded pool."""
    svc = start_records(redis_url, REDIS_POOL_SIZE=10)
    r = redis_sync.Redis.from_url(redis_url)
    rails = Rails(redis_url)
    clients = None
    n, groups = 2000, 20
    try:
        pipe = r.pipeline()
        for i in range(n):
            pipe.set(f"/current_users/storm-{i}", f'{{"id": {20000 + i}, "group_ids": [{7000 + i % groups}]}}')
        pipe.execute()
        rss_before = _rss_kib(svc.process.pid)
        started = time.monotonic()
        clients = SioClients(
            svc.url, [], generate={"count": n, "name": "s", "token": "storm-", "transports": ["websocket"]},
            timeout=60000,
        )
        clients.wait_connected([f"s{i}" for i in range(n)], timeout=120)
        print(f"{n} clients connected and in their rooms after {time.monotonic() - started:.1f}s")
        print(f"service memory per connection: {(_rss_kib(svc.process.pid) - rss_before) / n:.1f} KiB")
        for g in range(groups):
            rails.records(f"group-{7000 + g}", {"group": g})
        clients.wait(lambda _: clients.count("event") >= n, 60, "group deliveries")
        time.sleep(0.5)
        for i in range(n):
            assert payloads(clients, f"s{i}") == [{"room": f"group-{7000 + i % groups}", "records": {"group": i % groups}}]
        assert not any(l.get("type") == "connect_error" for l in clients.lines)
        assert "Too many connections" not in svc.logs()
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()
        r.close()


def test_a_client_that_connected_during_an_outage_recovers_its_next_drop(private_redis):
    """A connect while Redis is down gets a fresh session whose rooms wait
    for Redis; that session is stored once Redis is back, so the client's
    next drop recovers (and replays what it missed) instead of starting
    afresh again."""
    svc = start_records(private_redis.url)
    rails = Rails(private_redis.url)
    clients = None
    try:
        rails.token("tok-outage", 41, [410])
        rails.r.save()  # the restarted Redis loads the token
        svc.wait_http("/readyz", 20)
        private_redis.kill()
        wait_for(lambda: httpx.get(svc.url + "/readyz").status_code == 503, 15, what="not ready")
        clients = SioClients(svc.url, [{"name": "late", "token": "tok-outage", "transports": ["websocket"]}],
                             reconnectionDelay=50, reconnectionDelayMax=100)
        clients.wait_connected(["late"])
        first = clients.of("late", "connect")[0]
        assert first["recovered"] is False and first["pid"]

        private_redis.start()
        svc.wait_http("/readyz", 20)

        def joined():
            rails.records("group-410", {"probe": True})
            time.sleep(0.3)
            return any(p["records"].get("probe") for p in payloads(clients, "late"))

        wait_for(joined, 30, interval=0.2, what="rooms joined after redis came back")
        clients.send(cmd="drop", c="late")
        clients.wait_connected(["late"], count=2)
        again = clients.of("late", "connect")[1]
        assert again["recovered"] is True, again
        assert again["pid"] == first["pid"]
        rails.records("group-410", {"after": True})
        wait_for(lambda: any(p["records"].get("after") for p in payloads(clients, "late")), 15, what="event after")
    finally:
        if clients:
            clients.close()
        svc.stop()
        rails.close()
