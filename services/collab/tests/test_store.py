from channels_collab.store import Debounce, DraftStore

from tests.support import FakeClock


def test_debounce_waits_for_quiet():
    d = Debounce(5, 30)
    assert d.deadline is None and not d.pending
    assert d.changed(0) == 5
    assert d.changed(3) == 8
    assert not d.due(7.9) and d.due(8)


def test_debounce_is_forced_after_the_max_delay():
    d = Debounce(5, 30)
    for t in range(0, 40, 2):  # a change every 2 s, never 5 s of quiet
        deadline = d.changed(t)
        if t >= 26:
            assert deadline == 30
    assert d.due(30)
    d.stored()
    assert d.deadline is None
    assert d.changed(41) == 46


def test_store_round_trip_and_empty_documents():
    store = DraftStore(10, 60, clock=FakeClock(0.0))
    store.put("comment-1", b"state")
    assert store.get("comment-1") == b"state"
    store.put("comment-1", b"\x00\x00")  # now empty: no draft needed
    assert store.get("comment-1") is None and len(store) == 0


def test_store_count_bound_evicts_least_recently_used():
    store = DraftStore(2, 60, clock=FakeClock(0.0))
    store.put("a-1", b"1")
    store.put("b-1", b"2")
    store.get("a-1")  # a is used again: b is now the oldest
    store.put("c-1", b"3")
    assert "b-1" not in store and "a-1" in store and "c-1" in store
    assert store.evicted == 1


def test_store_idle_age_bound():
    clock = FakeClock(0.0)
    store = DraftStore(10, 60, clock=clock)
    store.put("a-1", b"1")
    clock.now = 30
    store.put("b-1", b"2")
    clock.now = 61
    assert store.sweep() == 1
    assert "a-1" not in store and "b-1" in store
    clock.now = 200
    assert store.get("b-1") is None
    assert store.total_bytes == 0
