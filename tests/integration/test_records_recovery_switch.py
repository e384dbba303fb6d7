"""Issue 25: recovery on another instance replays what was missed, first and once.

Two real records instances on one real Redis, a TCP proxy as the load
balancer, the real socket.io-client 4.8 on websocket with connection state
recovery. Instance A is killed (SIGKILL) and started again once while
Rails keeps publishing (the same few payloads over and over, as Rails does
for a record that changes often); its client recovers on the new process. Then, round after round, a
client connects to A and receives one event, the proxy cuts it and moves to
B, two events (group room, user room) are published while it is away, and
it comes back to B. Each recovered client must get every event it missed
exactly once, before the event published after it came back."""

from __future__ import annotations

import threading
import time

import pytest

from tests.integration.records_support import Rails, SioClients, TcpProxy, start_records
from tests.support import ServiceProcess

pytestmark = pytest.mark.slow

ROUNDS = 30
USER, GROUP = 2501, 2500
TOKEN = "tok-issue25"
GROUP_ROOM, USER_ROOM = f"group-{GROUP}", f"user-{USER}"
KINDS = 4  # payloads {"k": 0..3} in each room, published again and again


def received(clients, name):
    """(room, body, offset) of each records event the client got, in order."""
    return [(args[0]["room"], args[0]["records"], args[-1]) for args in clients.events(name, "records")]


def test_recovery_on_another_instance_replays_the_missed_events_first_and_once(redis_url):
    rails = Rails(redis_url)
    rails.token(TOKEN, USER, [GROUP])
    a = start_records(redis_url)
    b = start_records(redis_url)
    proxy = TcpProxy(a.port)
    clients = None
    started = [a, b]
    try:
        clients = SioClients(
            f"http://127.0.0.1:{proxy.port}",
            [{"name": "before", "token": TOKEN, "transports": ["websocket"]}],
            reconnectionDelay=50, reconnectionDelayMax=100,
        )
        clients.wait_connected(["before"])
        rails.records(GROUP_ROOM, {"first": True})
        clients.wait_events("before", 1, "records")

        # A is restarted while Rails publishes; its client is away meanwhile
        # and comes back to the new process while the publishing goes on.
        published = []
        stop = threading.Event()

        def publisher():
            while not stop.is_set():
                for k in range(KINDS):
                    for room in (GROUP_ROOM, USER_ROOM):
                        rails.records(room, {"k": k})
                        published.append((room, {"k": k}))
                time.sleep(0.02)

        proxy.outage()
        clients.wait(lambda _: clients.of("before", "disconnect"), 10, "drop before the restart")
        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            a.kill()  # SIGKILL: nothing of A's own state outlives it
            a = ServiceProcess("channels-records", a.port, a.env).start(ready=True)
            started.append(a)
            proxy.restore()
            clients.wait_connected(["before"], count=2)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join()
        assert clients.of("before", "connect")[1]["recovered"] is True
        rails.records(GROUP_ROOM, {"last": True})
        clients.wait(lambda _: received(clients, "before")[-1][1] == {"last": True}, 10, "the last event")
        got = received(clients, "before")
        assert [(room, body) for room, body, _ in got] == (
            [(GROUP_ROOM, {"first": True}), *published, (GROUP_ROOM, {"last": True})]
        ), f"back on the restarted A: {len(got) - 2} events of the {len(published)} published while away"
        clients.send(cmd="disconnect", c="before")

        failures = []
        for round_ in range(ROUNDS):
            name = f"r{round_}"
            proxy.switch(a.port, cut=False)
            clients.send(cmd="add", client={"name": name, "token": TOKEN, "transports": ["websocket"]})
            clients.wait_connected([name])
            assert clients.of(name, "connect")[0]["recovered"] is False
            want = [(GROUP_ROOM, {"k": round_ % KINDS})]
            rails.records(*want[0])
            clients.wait_events(name, 1, "records")
            # The load balancer moves the client: cut, and new connections go to B.
            proxy.outage()
            clients.wait(lambda _, n=name: clients.of(n, "disconnect"), 10, f"{name} dropped")
            proxy.switch(b.port, cut=False)
            want += [(GROUP_ROOM, {"k": (round_ + 1) % KINDS}), (USER_ROOM, {"k": (round_ + 2) % KINDS})]
            rails.records(*want[1])
            rails.records(*want[2])
            # Away for 0 to 30 ms after the publishes: the restore meets B
            # before, while and after it logs and relays them.
            time.sleep((round_ % 7) * 0.005)
            proxy.restore()
            clients.wait_connected([name], count=2)
            again = clients.of(name, "connect")[1]
            assert again["recovered"] is True, (name, again)
            want.append((GROUP_ROOM, {"after": round_}))
            rails.records(*want[3])
            clients.wait(lambda _, n=name, w=want[3][1]: any(body == w for _, body, _ in received(clients, n)), 10,
                         f"{name}: the event after")
            clients.send(cmd="disconnect", c=name)
            got = [(room, body) for room, body, _ in received(clients, name)]
            if got != want:
                failures.append((round_, got))
        # Nothing arrives late either (a duplicate, a replay after the new event).
        time.sleep(0.3)
        for round_ in range(ROUNDS):
            got = [(room, body) for room, body, _ in received(clients, f"r{round_}")]
            if len(got) != 4 and all(f[0] != round_ for f in failures):
                failures.append((round_, got))
        assert not failures, f"{len(failures)} of {ROUNDS} rounds went wrong: {failures}"
    finally:
        if clients:
            clients.close()
        for svc in started:
            svc.stop()
        proxy.close()
        rails.close()
