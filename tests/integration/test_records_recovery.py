"""Connection state recovery with the real socket.io-client 4.8, real Redis
and real service processes. A network drop is a TCP proxy between client
and service that cuts every connection and refuses new ones for a while.
Every test counts deliveries: each event once, in publish order."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import threading
import time

import pytest
import socketio

from tests.integration.records_support import Rails, SioClients, TcpProxy, start_records
from tests.support import ServiceProcess

# Starts the service as a process per module or test: out of `make test-fast`.
pytestmark = pytest.mark.slow


def seqs(clients, name):
    return [args[0]["records"]["seq"] for args in clients.events(name, "records")]


def connects(clients, name):
    return clients.of(name, "connect")


class Setup:
    def __init__(self, redis_url, **env):
        self.redis_url = redis_url
        self.svc = start_records(redis_url, **env)
        self.proxy = TcpProxy(self.svc.port)
        self.rails = Rails(redis_url)
        self.clients: SioClients | None = None
        self.extra: list = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.proxy.port}"

    def open(self, specs, **config):
        self.clients = SioClients(self.url, specs, **config)
        return self.clients

    def publish(self, room, start, stop):
        for i in range(start, stop):
            self.rails.records(room, {"seq": i})

    def close(self):
        if self.clients:
            self.clients.close()
        for thing in self.extra:
            thing.stop()
        self.svc.stop()
        self.proxy.close()
        self.rails.close()


@pytest.fixture
def setup_factory(redis_url):
    made = []

    def make(**env):
        s = Setup(redis_url, **env)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def session_expired(s, pid: str, timeout: float = 15.0) -> None:
    """Wait until Redis has expired the session of `pid` (its window has
    passed since the last sign of life), rather than guess how long it takes."""
    key = "recovery:session:" + hashlib.sha256(pid.encode()).hexdigest()
    deadline = time.monotonic() + timeout
    while s.rails.r.exists(key):
        assert time.monotonic() < deadline, "the session never expired"
        time.sleep(0.05)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_recovery_after_drops_replays_exactly_what_was_missed(setup_factory, transport):
    """Own connection dropped, three times in a row (socket.io#4880, #5419),
    the first time before the client received any event (socket.io#5538).
    At DEBUG log level, so that no secret hides behind a quieter level."""
    s = setup_factory(LOG_LEVEL="DEBUG")
    s.rails.token(f"tok-rec-{transport}", 101, [1010])
    c = s.open([{"name": "a", "token": f"tok-rec-{transport}", "transports": [transport]}])
    c.wait_connected(["a"])
    first = connects(c, "a")[0]
    assert first["pid"] and first["recovered"] is False
    seq = 0
    for round_ in range(1, 4):
        if round_ > 1:
            s.publish("group-1010", seq, seq + 3)  # received live
            seq += 3
            c.wait_events("a", seq, "records")
        s.proxy.outage()
        c.wait(lambda _, n=round_: len(c.of("a", "disconnect")) >= n, 20, f"drop {round_}")
        s.publish("group-1010", seq, seq + 2)  # missed while away, a notice among them
        s.rails.notice({"round": round_})
        s.publish("group-1010", seq + 2, seq + 4)
        seq += 4
        time.sleep(0.3)
        s.proxy.restore()
        c.wait_connected(["a"], count=round_ + 1, timeout=30)
        again = connects(c, "a")[round_]
        assert again["recovered"] is True, again
        assert again["id"] == first["id"] and again["pid"] == first["pid"]
        c.wait_events("a", seq, "records", timeout=20)
    s.publish("group-1010", seq, seq + 3)
    seq += 3
    c.wait_events("a", seq, "records")
    time.sleep(0.3)
    assert seqs(c, "a") == list(range(seq))
    # Notices are replayed too, in publish order among the records.
    order = [(e["event"], e["args"][0].get("round", e["args"][0].get("records", {}).get("seq"))) for e in c.of("a", "event")]
    for round_ in range(1, 4):
        at = order.index(("notice", round_))
        assert order[at - 1][0] == "records" and order[at + 1] == ("records", order[at - 1][1] + 1)
    offsets = [args[-1] for args in c.events("a", "records")]
    assert all(isinstance(o, str) for o in offsets)
    logs = s.svc.logs()
    assert first["pid"] not in logs
    assert f"tok-rec-{transport}" not in logs


def test_long_connection_then_drop_then_expiry(setup_factory):
    """Connected for longer than the window (socket.io#5282) and recovering
    more than 10 s after connecting (socket.io-redis-streams-adapter#48)
    works; once the window has passed since the drop, a fresh connection
    with rooms from the token."""
    s = setup_factory(RECOVERY_WINDOW_SECONDS=3)
    s.rails.token("tok-long", 102, [1020])
    c = s.open([{"name": "a", "token": "tok-long", "transports": ["websocket"]}])
    c.wait_connected(["a"])
    first = connects(c, "a")[0]
    s.publish("group-1020", 0, 1)
    c.wait_events("a", 1)
    time.sleep(11)
    s.proxy.outage()
    c.wait(lambda _: c.of("a", "disconnect"), 20, "drop")
    s.publish("group-1020", 1, 4)
    time.sleep(0.5)
    s.proxy.restore()
    c.wait_connected(["a"], count=2)
    assert connects(c, "a")[1]["recovered"] is True
    assert connects(c, "a")[1]["id"] == first["id"]
    c.wait_events("a", 4)
    assert seqs(c, "a") == [0, 1, 2, 3]

    s.proxy.outage()
    c.wait(lambda _: len(c.of("a", "disconnect")) >= 2, 20, "second drop")
    s.publish("group-1020", 4, 5)  # lost for good: the window passes
    session_expired(s, first["pid"])
    s.proxy.restore()
    c.wait_connected(["a"], count=3)
    third = connects(c, "a")[2]
    assert third["recovered"] is False
    assert third["id"] != first["id"]
    s.publish("group-1020", 5, 6)  # rooms come from the token again
    c.wait_events("a", 5)
    time.sleep(0.3)
    assert seqs(c, "a") == [0, 1, 2, 3, 5]


async def test_unknown_pid_other_token_and_explicit_disconnect(setup_factory):
    s = setup_factory()
    s.rails.token("tok-owner", 103, [1030])
    s.rails.token("tok-thief", 104, [1040])
    c = s.open([{"name": "a", "token": "tok-owner", "transports": ["websocket"]}])
    c.wait_connected(["a"])
    first = connects(c, "a")[0]
    s.publish("group-1030", 0, 1)
    offset = c.wait_events("a", 1)[0][-1]

    async def attempt(token, auth):
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(f"{s.svc.url}?channel_token={token}", auth=auth, transports=["websocket"])
        sid = client.get_sid()
        await client.disconnect()
        return sid

    # A pid nobody issued, and a real pid with another channel token: fresh sessions.
    assert await attempt("tok-owner", {"pid": "x" * 32, "offset": offset}) != first["id"]
    assert await attempt("tok-thief", {"pid": first["pid"], "offset": offset}) != first["id"]
    # Malformed recovery payloads are fresh sessions too, never an error.
    for auth in ({"pid": 12}, {"pid": "y" * 40, "offset": {"$gt": ""}}, {"pid": "z" * 500}):
        assert await attempt("tok-owner", auth) != first["id"]
    # The owner's session was not disturbed by any of that.
    s.proxy.outage()
    c.wait(lambda _: c.of("a", "disconnect"), 20, "drop")
    s.proxy.restore()
    c.wait_connected(["a"], count=2)
    assert connects(c, "a")[1]["recovered"] is True
    # A client that leaves on purpose has nothing to come back to.
    c.send(cmd="disconnect", c="a")
    c.wait(lambda _: len(c.of("a", "disconnect")) >= 2, 10, "explicit disconnect")
    await asyncio.sleep(0.3)
    c.send(cmd="connect", c="a")
    c.wait_connected(["a"], count=3)
    assert connects(c, "a")[2]["recovered"] is False
    assert first["pid"] not in s.svc.logs()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_recovery_across_a_service_restart(setup_factory, how):
    """The client is away while the service is killed (or stopped) and started
    again: its session and the events it missed are in Redis."""
    s = setup_factory()
    s.rails.token("tok-restart", 105, [1050])
    c = s.open([
        {"name": "away", "token": "tok-restart", "transports": ["websocket"]},
        {"name": "stays", "token": "tok-restart", "transports": ["polling"]},
    ])
    c.wait_connected(["away", "stays"])
    first = {n: connects(c, n)[0] for n in ["away", "stays"]}
    s.publish("group-1050", 0, 3)
    c.wait_events("away", 3)
    c.wait_events("stays", 3)
    # "away" loses its network; "stays" is connected when the process dies.
    c.send(cmd="drop", c="away")  # engine closed from the client side: reconnects by itself later
    s.proxy.outage()
    c.wait(lambda _: c.of("away", "disconnect"), 20, "away dropped")
    s.publish("group-1050", 3, 6)  # relayed and logged by the first process only
    time.sleep(0.5)
    if how == signal.SIGKILL:
        s.svc.kill()
    else:
        s.svc.signal(signal.SIGTERM)
        s.svc.process.wait(15)
    svc2 = ServiceProcess("channels-records", s.svc.port, s.svc.env).start(ready=True)
    s.extra.append(svc2)
    s.proxy.restore()
    c.wait_connected(["away", "stays"], count=2, timeout=30)
    for name in ["away", "stays"]:
        again = connects(c, name)[1]
        assert again["recovered"] is True, (name, again)
        assert again["id"] == first[name]["id"]
    s.publish("group-1050", 6, 9)
    for name in ["away", "stays"]:
        c.wait_events(name, 9, timeout=20)
    time.sleep(0.3)
    for name in ["away", "stays"]:
        assert seqs(c, name) == list(range(9)), name


@pytest.mark.slow
def test_two_instances_behind_a_switching_proxy_exactly_once(setup_factory, redis_url):
    """Both instances receive every Redis message and log it; the proxy moves
    the clients between them mid-stream, several times. Each client gets
    every event exactly once, in publish order."""
    s = setup_factory()
    other = start_records(redis_url)
    s.extra.append(other)
    ports = [s.svc.port, other.port]
    s.rails.token("tok-lb", 106, [1060])
    c = s.open([
        {"name": "ws", "token": "tok-lb", "transports": ["websocket"]},
        {"name": "poll", "token": "tok-lb", "transports": ["polling"]},
        {"name": "upgrade", "token": "tok-lb"},
    ])
    names = ["ws", "poll", "upgrade"]
    c.wait_connected(names)
    total = 300
    stop = threading.Event()

    def publisher():
        for i in range(total):
            s.rails.records("group-1060", {"seq": i})
            time.sleep(0.01)
        stop.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    switches = 0
    while not stop.is_set() and switches < 4:
        time.sleep(0.6)
        switches += 1
        s.proxy.switch(ports[switches % 2])
    thread.join()
    for name in names:
        c.wait_events(name, total, "records", timeout=30)
    time.sleep(0.5)
    for name in names:
        got = seqs(c, name)
        assert got == list(range(total)), (name, len(got), [x for x in got if got.count(x) > 1][:5])
        later = connects(c, name)[1:]
        assert later and all(x["recovered"] for x in later), (name, later)
    assert switches >= 3


@pytest.mark.slow
def test_reconnect_storm_after_a_deploy_recovers_everyone(redis_url):
    """600 clients come back at once to the next process after SIGTERM; each
    restore reads only its own rooms, and every client recovers."""
    import redis as redis_sync

    svc = start_records(redis_url)
    rails = Rails(redis_url)
    r = redis_sync.Redis.from_url(redis_url)
    n, groups = 600, 20
    clients = None
    svc2 = None
    try:
        pipe = r.pipeline()
        for i in range(n):
            pipe.set(f"/current_users/deploy-{i}", f'{{"id": {30000 + i}, "group_ids": [{8000 + i % groups}]}}')
        pipe.execute()
        clients = SioClients(
            svc.url, [], generate={"count": n, "name": "d", "token": "deploy-", "transports": ["websocket"]},
            timeout=60000, quietEvents=False,
        )
        names = [f"d{i}" for i in range(n)]
        clients.wait_connected(names, timeout=120)
        for g in range(groups):
            rails.records(f"group-{8000 + g}", {"seq": 0})
        clients.wait(lambda _: clients.count("event") >= n, 60, "first round")
        svc.signal(signal.SIGTERM)
        svc.process.wait(20)
        svc2 = ServiceProcess("channels-records", svc.port, svc.env).start(ready=True)
        clients.wait_connected(names, count=2, timeout=120)
        for g in range(groups):
            rails.records(f"group-{8000 + g}", {"seq": 1})
        clients.wait(lambda _: clients.count("event") >= 2 * n, 60, "second round")
        time.sleep(0.5)
        not_recovered = [name for name in names if not connects(clients, name)[1]["recovered"]]
        assert not_recovered == []
        for name in names:
            assert seqs(clients, name) == [0, 1], name
    finally:
        if clients:
            clients.close()
        if svc2:
            svc2.stop()
        svc.stop()
        rails.close()
        r.close()


def test_the_per_room_cap_refuses_a_client_that_missed_more_and_recovers_one_that_missed_less(setup_factory):
    """RECOVERY_MAX_EVENTS_PER_ROOM: the log of a busy room is cut to about
    the cap. A client that missed more than it holds gets a fresh session
    (recovered: false, a log line), never a partial replay; one that missed
    less, in a quiet room, gets every missed event exactly once."""
    s = setup_factory(RECOVERY_MAX_EVENTS_PER_ROOM=100)
    s.rails.token("tok-busy", 110, [1100])
    s.rails.token("tok-quiet", 111, [1110])
    c = s.open([
        {"name": "busy", "token": "tok-busy", "transports": ["websocket"]},
        {"name": "quiet", "token": "tok-quiet", "transports": ["polling"]},
    ])
    c.wait_connected(["busy", "quiet"])
    s.publish("group-1100", 0, 2)
    s.publish("group-1110", 0, 2)
    c.wait_events("busy", 2)
    c.wait_events("quiet", 2)
    s.proxy.outage()
    c.wait(lambda _: c.of("busy", "disconnect") and c.of("quiet", "disconnect"), 20, "drops")
    s.publish("group-1100", 2, 402)  # far more than the cap (and its one stream node of slack)
    s.publish("group-1110", 2, 22)
    time.sleep(0.5)
    s.proxy.restore()
    c.wait_connected(["busy", "quiet"], count=2, timeout=30)
    assert connects(c, "busy")[1]["recovered"] is False
    assert connects(c, "quiet")[1]["recovered"] is True
    c.wait_events("quiet", 22)
    s.publish("group-1100", 402, 405)  # the fresh session is in its rooms again
    c.wait_events("busy", 5)
    time.sleep(0.3)
    assert seqs(c, "quiet") == list(range(22))
    assert seqs(c, "busy") == [0, 1, 402, 403, 404]  # nothing of the gap, no partial replay
    logs = s.svc.logs()
    assert "missed more events than the log holds" in logs
