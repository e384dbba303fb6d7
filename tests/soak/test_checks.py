"""The soak's own logic, fast: the schedule a seed makes, and checkers that
fail on the defects they are there to catch (fed made-up observations)."""

from __future__ import annotations

import threading

from tests.soak.bots_load import BotsLoad
from tests.soak.collab_load import CollabFigures, CollabLoad, Editor
from tests.soak.records_load import RecordsLoad
from tests.soak.schedule import make_schedule, summary

COUNTS = {"records": 2, "collab": 3, "bots": 1}


def test_a_seed_replays_its_schedule_and_keeps_to_the_rules():
    clients = ["b0", "b1"]
    first = make_schedule(7, 600, COUNTS, clients)
    assert first == make_schedule(7, 600, COUNTS, clients)
    assert first != make_schedule(8, 600, COUNTS, clients)
    kinds = {f.kind for f in first}
    assert kinds == {"kill", "term", "redis", "cut", "stall", "away", "ghost"}
    assert all(3 <= f.at <= 595 for f in first if f.kind != "ghost")
    # a service with one instance is never killed; Redis about once a minute
    assert not [f for f in first if f.kind in ("kill", "term") and f.target.startswith("bots")]
    assert sum(f.kind == "redis" for f in first) == 10
    assert summary(first).startswith(f"{len(first)} faults (")
    assert sum(f.kind == "redis" for f in make_schedule(7, 45, COUNTS, clients)) == 1


def records_with(got: dict[str, list[int]], published: int, timeline=None) -> RecordsLoad:
    load = RecordsLoad("redis://unused", 1, 1, 1.0, 1, cap=1000)
    b = load.clients[0]
    load.published = {room: [float(i) for i in range(published)] for room in b.rooms}
    b.got = got
    b.timeline = timeline or [(0.0, "connect", False)]
    load.t0 = 0.0
    return load


def test_the_records_check_counts_what_was_missed_doubled_or_reordered():
    load = records_with({}, 3)
    rooms = load.clients[0].rooms
    load.clients[0].got = {rooms[0]: [1, 2, 3], rooms[1]: [1, 3], rooms[2]: [1, 2, 2, 3], rooms[3]: [2, 1, 3]}
    f = load.check()
    assert (f.expected, f.missing, f.doubled) == (12, 1, 1)
    assert f.disordered == 2  # 2 after 2 in the doubled room, 1 after 2 in the last
    assert f.once == 10
    assert len(f.problems) == 3


def test_a_reconnect_without_recovery_fails_unless_the_cap_was_passed():
    timeline = [(0.0, "connect", False), (1.0, "disconnect", "transport close"), (2.5, "connect", False)]
    load = records_with({}, 3, timeline)
    for room in load.clients[0].rooms:
        load.clients[0].got[room] = [1, 2, 3]
    f = load.check()
    assert (f.not_recovered, f.not_recovered_allowed) == (1, 0)
    assert "recovered: false" in f.problems[0]
    load.cap = 0  # one message published while away is then past the cap
    f = load.check()
    assert (f.not_recovered, f.not_recovered_allowed, f.problems) == (1, 1, [])


def editor(name: str, key: str, edits, acked: int) -> Editor:
    e = object.__new__(Editor)
    e.name, e.version, e.keys = name, "v4", [key]
    e.edits, e.acked, e.dead_at = {key: edits}, {key: acked}, None
    e.cond = threading.Condition()
    return e


def test_the_collab_check_fails_on_a_lost_acknowledged_edit_and_on_divergence():
    load = CollabLoad(1, 1, 1.0, 1)
    doc = load.docs[0]
    load.editors = [editor("a", f"s:{doc}", [(1, "insert", "[a0.1]"), (2, "insert", "[a0.2]"),
                                            (3, "delete", "[a0.1]"), (4, "insert", "[a0.3]")], acked=3)]
    good = CollabFigures()
    load.check([{doc: {"a:s": "[a0.2][a0.3]", "fresh": "[a0.2][a0.3]"}}], good)
    assert (good.acked_edits, good.kept, good.lost, good.converged, good.problems) == (2, 2, 0, True, [])
    bad = CollabFigures()
    load.check([{doc: {"a:s": "[a0.2]", "fresh": "[a0.1][a0.3]x"}}], bad)
    assert bad.lost == 2  # [a0.2] gone from the fresh reader, the deleted [a0.1] back in it
    assert not bad.converged
    assert any("no marker" in p for p in bad.problems)


def test_the_bots_check_counts_doubles_and_gaps():
    load = object.__new__(BotsLoad)
    load.published, load.uncertain, load.times, load.t0 = {0: 4, 1: 2, 2: 1}, set(), {}, 0.0
    posted = {0: [1, 2, 2, 3, 4], 1: [2], 2: [1]}
    load.numbers = posted.__getitem__
    f = load.check()
    assert (f.expected, f.once, f.missing, f.doubled) == (7, 5, 1, 1)


def test_the_hostile_checks_fail_on_heads_never_closed_and_a_greedy_socket_past_its_share():
    from collections import Counter

    from tests.soak.hostile import HUNG_UP_GRACE_SECONDS, SEEN_CALLS_PER_SOCKET, Hostile

    class Rails:  # what the Rails stand-in counts per token
        def __init__(self):
            self.lock = threading.Lock()
            self.calls_at = {"504,fair": [10.0, 11.0, 13.0 + HUNG_UP_GRACE_SECONDS - 1], "504,hog": [10.0, 30.0]}
            self.peak_in_flight_by = Counter({"504,fair": SEEN_CALLS_PER_SOCKET, "504,hog": 32})

    rails = Rails()
    hostile = Hostile(0, 0, "redis://unused", 1, None)
    hostile.drips_closed = 5
    hostile.greedy_hung_up = {"504,fair": 13.0}
    assert hostile.check(rails) == []
    hostile.drips_outlived = 2
    hostile.greedy_hung_up["504,hog"] = 13.0
    problems = hostile.check(rails)
    assert len(problems) == 3, problems
    assert problems[0].startswith("2 drip-fed request heads were sent whole")
    assert "had 32 calls at Rails at once" in problems[1]
    assert problems[2].startswith("1 of a greedy pre-auth socket's 2 calls to Rails began over")
