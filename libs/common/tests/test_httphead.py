"""The request-head guard with a test clock: deadline, bound, order."""

from __future__ import annotations

import asyncio

from channels_common.httphead import BOUND, DEADLINE, HeadGuard

from tests.support import FakeClock


class Conn:
    def __init__(self, name):
        self.name = name
        self.expired = None

    def head_expired(self, cause):
        self.expired = cause


async def test_a_head_past_the_deadline_is_closed_and_others_are_not():
    clock = FakeClock(100.0)
    closed = []
    guard = HeadGuard(0.05, 10, on_close=closed.append, clock=clock)
    slow, done, late = Conn("slow"), Conn("done"), Conn("late")
    guard.begin(slow)
    guard.begin(done)
    guard.end(done)  # its headers came
    clock.advance(0.03)
    guard.begin(late)
    guard.begin(slow)  # a second begin keeps the first one's clock
    clock.advance(0.03)
    await asyncio.sleep(0.05)  # a check or two
    assert slow.expired == DEADLINE and done.expired is None and late.expired is None
    assert closed == [DEADLINE] and len(guard) == 1
    clock.advance(1)
    await asyncio.sleep(0.05)
    assert late.expired == DEADLINE and len(guard) == 0


async def test_past_the_bound_the_oldest_head_goes():
    closed = []
    guard = HeadGuard(30, 3, on_close=closed.append)
    conns = [Conn(i) for i in range(5)]
    for conn in conns:
        guard.begin(conn)
    assert [c.expired for c in conns] == [BOUND, BOUND, None, None, None]
    assert closed == [BOUND, BOUND] and len(guard) == 3
    guard.end(conns[3])
    guard.begin(Conn("new"))  # room for it: nobody else goes
    assert conns[2].expired is None and len(guard) == 3
