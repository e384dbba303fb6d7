"""Issue 24: an instance whose subscription comes back later than another's
delivers what was published in between to its connected sockets, from the
shared recovery log, in order and once, before anything newer.

Two real records instances on one real Redis; instance B reaches Redis
through a TCP proxy whose outage cuts B alone (its subscription and its
pool) while A goes on relaying and logging. The connected clients are the
real socket.io-client 4.8, on websocket and on long-polling, and they never
reconnect: nothing but B's catch-up can bring them what they missed."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.records_support import Rails, SioClients, TcpProxy, start_records
from tests.support import wait_for

pytestmark = pytest.mark.slow

USER, GROUP = 2601, 2600
TOKEN = "tok-issue24-resub"
ROOM = f"group-{GROUP}"


def numbers(clients, name):
    return [args[0]["records"]["n"] for args in clients.events(name, "records") if args[0]["room"] == ROOM]


def ready(svc) -> bool:
    try:
        return httpx.get(svc.url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Gap:
    """A, and B behind a proxy; A's client and B's two, each having got
    event 0; then B cut off from Redis while `gap` events are published
    (A relays and logs them), B back, five more events."""

    def __init__(self, redis_url: str, gap: int, **env):
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        self.rails = Rails(redis_url)
        self.rails.token(TOKEN, USER, [GROUP])
        self.proxy = TcpProxy(port)
        self.a = start_records(redis_url, **env)
        self.b = start_records(f"redis://127.0.0.1:{self.proxy.port}/0", **env)
        self.on_a = SioClients(self.a.url, [{"name": "a_ws", "token": TOKEN, "transports": ["websocket"]}])
        self.on_b = SioClients(self.b.url, [
            {"name": "b_ws", "token": TOKEN, "transports": ["websocket"]},
            {"name": "b_poll", "token": TOKEN, "transports": ["polling"]},
        ])
        self.gap = gap

    def run(self) -> None:
        on_a, on_b = self.on_a, self.on_b
        on_a.wait_connected(["a_ws"])
        on_b.wait_connected(["b_ws", "b_poll"])
        n = 0
        self.rails.records(ROOM, {"n": n})
        wait_for(lambda: numbers(on_a, "a_ws") == [0], 15, what="A's client got the first event")
        for name in ("b_ws", "b_poll"):
            wait_for(lambda name=name: numbers(on_b, name) == [0], 15, what=f"{name} got the first event")

        self.proxy.outage()  # B alone loses Redis
        wait_for(lambda: not ready(self.b), 15, what="B's subscription lost")
        for _ in range(self.gap):
            n += 1
            self.rails.records(ROOM, {"n": n})
        wait_for(lambda: len(numbers(on_a, "a_ws")) == n + 1, 30, what="A relayed the gap")
        self.last_gap = n
        self.proxy.restore()
        wait_for(lambda: ready(self.b), 30, what="B's subscription back")
        for _ in range(5):
            n += 1
            self.rails.records(ROOM, {"n": n})
        self.last = n

    def close(self) -> None:
        self.on_a.close()
        self.on_b.close()
        self.a.stop()
        self.b.stop()
        self.proxy.close()
        self.rails.close()


def test_a_late_resubscription_delivers_the_gap_in_order_and_once(redis_url):
    gap = Gap(redis_url, gap=12)
    try:
        gap.run()
        expected = list(range(gap.last + 1))
        wait_for(lambda: len(numbers(gap.on_a, "a_ws")) >= gap.last + 1, 20, what="A's client got every event")
        for name in ("b_ws", "b_poll"):
            wait_for(lambda name=name: len(numbers(gap.on_b, name)) >= gap.last + 1, 20,
                     what=f"{name} got every event")
        assert numbers(gap.on_a, "a_ws") == expected
        for name in ("b_ws", "b_poll"):
            assert numbers(gap.on_b, name) == expected, name
            assert gap.on_b.of(name, "disconnect") == [], f"{name} was disconnected"
        assert "caught up after resubscribing" in gap.b.logs()
    finally:
        gap.close()


def test_a_gap_the_log_no_longer_holds_disconnects_the_rooms_sockets(redis_url):
    """Past the per-room cap the log is trimmed beyond B's last offset: B
    cannot replay the gap, so its clients are cut and come back with
    `recovered: false` (a fresh state), never with a silent hole."""
    gap = Gap(redis_url, gap=250, RECOVERY_MAX_EVENTS_PER_ROOM=10)
    try:
        gap.run()
        on_b = gap.on_b
        for name in ("b_ws", "b_poll"):
            wait_for(lambda name=name: on_b.of(name, "disconnect"), 20, what=f"{name} cut")
            on_b.wait_connected([name], count=2)
        for name in ("b_ws", "b_poll"):
            got = numbers(on_b, name)
            assert got[0] == 0 and got == sorted(set(got)), name
            # No gap event reached it: it was cut instead.
            assert not [x for x in got if 0 < x <= gap.last_gap], name
            assert on_b.of(name, "connect")[-1]["recovered"] is False
        assert "cannot be replayed" in gap.b.logs()
    finally:
        gap.close()
