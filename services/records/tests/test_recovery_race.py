"""A recovering socket joins its rooms only once the restore has read the
log; whatever this instance broadcast in between is read a second time
(fake store; the real one is exercised by the recovery integration tests)."""

from __future__ import annotations

import types

from channels_records.connections import Connections
from channels_records.protocol import RecoveryRequest
from channels_records.recovery import LoggedEvent, offset_key


class Store:
    def __init__(self, log):
        self.log = log
        self.reads = []

    async def restore(self, pid, token, offset):
        self.reads.append(offset)
        after = [e for e in self.log if offset is None or offset_key(e.offset) > offset_key(offset)]
        return types.SimpleNamespace(sid="s", rooms=["g"], missed=after)


def make(store, relayed):
    engine = types.SimpleNamespace(sockets={})
    return Connections(
        engine, None, None, None, None, store, order_key=offset_key, relayed_offset=lambda: relayed
    )


def ev(offset):
    return LoggedEvent(offset, "records", b"{}")


async def test_events_broadcast_during_the_restore_are_read_again():
    store = Store([ev("1-0"), ev("2-0"), ev("3-0")])
    c = make(store, relayed="3-0")  # 3-0 went out after the first read saw up to 2-0
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0"), ev("2-0")])
    assert [e.offset for e in missed] == ["1-0", "2-0", "3-0"]
    assert store.reads == ["2-0"]


async def test_no_second_read_when_the_first_saw_everything_broadcast():
    store = Store([ev("1-0")])
    c = make(store, relayed="1-0")
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "0-1"), "tok", [ev("1-0")])
    assert [e.offset for e in missed] == ["1-0"] and store.reads == []
    c = make(store, relayed=None)
    assert await c._missed_meanwhile(RecoveryRequest("p" * 20, None), "tok", []) == []
    assert store.reads == []


async def test_nothing_missed_and_something_broadcast_meanwhile():
    store = Store([ev("5-0")])
    c = make(store, relayed="5-0")
    missed = await c._missed_meanwhile(RecoveryRequest("p" * 20, "4-0"), "tok", [])
    assert [e.offset for e in missed] == ["5-0"] and store.reads == ["4-0"]
