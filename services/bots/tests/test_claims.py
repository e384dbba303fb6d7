"""The claim scripts against a real Redis: numbering in the order heard,
repeats within the window, one owner per room, takeover after the lease,
the gap rule, fencing of a lost owner, and state lost to eviction."""

from __future__ import annotations

import asyncio

import pytest
from channels_bots.claims import BUSY, EPOCH, GAP, OWNER, STALE, RedisClaims

ROOM = "r1"


def instance(redis, name: str, lease: float = 0.3, window: float = 60.0, gap: float | None = None) -> RedisClaims:
    return RedisClaims(redis, instance=name, prefix="test-claims:", lease=lease, window=window, gap=gap)


async def test_messages_are_numbered_once_in_the_order_first_heard(redis):
    a, b = instance(redis, "a"), instance(redis, "b")
    first = await a.register(ROOM, [("m1", True), ("m2", True)])
    again = await b.register(ROOM, [("m1", True), ("m2", True), ("m3", True)])
    assert [r.seq for r in first] == [1, 2]
    assert [r.seq for r in again] == [1, 2, 3]
    assert {r.epoch for r in first + again} == {first[0].epoch}
    # Another instance hearing the same publish is no repeat; the same
    # instance hearing it again (an identical publish) is.
    assert not any(r.repeat for r in first + again)
    (repeat,) = await a.register(ROOM, [("m1", True)])
    assert repeat.repeat and repeat.seq == 1
    (renumbered,) = await a.register(ROOM, [("m1", False)])
    assert not renumbered.repeat


async def test_every_key_expires_within_the_window(redis):
    a = instance(redis, "a", window=30.0)
    await a.register(ROOM, [("m1", True)])
    await a.take(ROOM, (await a.register(ROOM, [("m1", False)]))[0].epoch, 1)
    keys = await redis.keys("test-claims:*")
    assert len(keys) == 2
    for key in keys:
        assert 0 < await redis.pttl(key) <= 30_000


async def test_one_owner_at_a_time_and_takeover_once_the_lease_lapses(redis):
    a, b = instance(redis, "a", lease=1.0), instance(redis, "b", lease=1.0)
    (place,) = await a.register(ROOM, [("m1", True)])
    await b.register(ROOM, [("m1", True)])
    assert (await a.take(ROOM, place.epoch, 1)).status == OWNER
    assert (await b.take(ROOM, place.epoch, 1)).status == BUSY
    assert await a.renew(ROOM, place.epoch)
    await asyncio.sleep(1.1)  # a stops renewing: it died
    grant = await b.take(ROOM, place.epoch, 1)
    assert grant.status == OWNER and grant.taken_over
    # The old owner is fenced off: it can neither renew nor finish.
    assert not await a.renew(ROOM, place.epoch)
    assert not await a.finish(ROOM, place.epoch, 1)
    assert await b.finish(ROOM, place.epoch, 1)
    assert (await a.take(ROOM, place.epoch, 1)).status == STALE


async def test_a_released_room_is_taken_at_once_and_is_no_takeover(redis):
    a, b = instance(redis, "a", lease=30.0), instance(redis, "b", lease=30.0)
    (place,) = await a.register(ROOM, [("m1", True)])
    assert (await a.take(ROOM, place.epoch, 1)).status == OWNER
    await a.release(ROOM, place.epoch)
    grant = await b.take(ROOM, place.epoch, 1)
    assert grant.status == OWNER and not grant.taken_over


async def test_a_gap_at_the_head_waits_for_its_holder_then_is_skipped(redis):
    a = instance(redis, "a", gap=0.3)
    b = instance(redis, "b", gap=0.3)
    places = await a.register(ROOM, [("m1", True), ("m2", True), ("m3", True)])
    epoch = places[0].epoch
    # b heard only m3, c (gone) only m2: nobody holds m1 any more.
    assert (await b.take(ROOM, epoch, 3)).status == GAP
    assert (await a.take(ROOM, epoch, 2)).status == GAP
    await asyncio.sleep(0.35)
    # The lowest holder wins: b may not skip m2, which a holds.
    assert (await b.take(ROOM, epoch, 3)).status == GAP
    grant = await a.take(ROOM, epoch, 2)
    assert grant.status == OWNER and grant.skipped == 1 and grant.done == 1


async def test_the_head_holder_claims_at_once_despite_a_gap_timer(redis):
    a, b = instance(redis, "a", gap=30.0), instance(redis, "b", gap=30.0)
    places = await a.register(ROOM, [("m1", True), ("m2", True)])
    epoch = places[0].epoch
    assert (await b.take(ROOM, epoch, 2)).status == GAP
    assert (await a.take(ROOM, epoch, 1)).status == OWNER


async def test_lost_room_state_is_a_new_epoch_and_messages_are_numbered_again(redis):
    a = instance(redis, "a")
    (old,) = await a.register(ROOM, [("m1", True)])
    await redis.delete("test-claims:room:" + ROOM)  # what allkeys-lru may do
    assert (await a.take(ROOM, old.epoch, 1)).status == EPOCH
    assert not await a.renew(ROOM, old.epoch)
    (new,) = await a.register(ROOM, [("m1", False)])
    assert new.epoch != old.epoch and new.seq == 1
    assert (await a.take(ROOM, new.epoch, 1)).status == OWNER


@pytest.fixture(autouse=True)
async def _clean(redis):
    yield
    keys = await redis.keys("test-claims:*")
    if keys:
        await redis.delete(*keys)


async def test_numbering_refuses_to_mix_epochs(redis):
    a = instance(redis, "a")
    (old,) = await a.register(ROOM, [("m1", True)])
    await redis.delete("test-claims:room:" + ROOM)
    # m2 heard after m1: it must not be numbered before m1 is, in the new epoch.
    assert await a.register(ROOM, [("m2", True)], old.epoch) is None
    assert await redis.exists("test-claims:room:" + ROOM) == 0
    again = await a.register(ROOM, [("m1", False), ("m2", True)])
    assert [r.seq for r in again] == [1, 2]


async def test_a_batch_is_numbered_atomically_whatever_runs_between_its_messages(redis):
    """Two instances number the same 1500 messages (more than Redis reads
    from a connection at once, so other clients' commands could fall between
    them) while their room's hash is deleted again and again (eviction, as
    allkeys-lru does between any two commands): each batch is refused whole or
    numbered whole, in one epoch and in its order, and a refused batch
    counts nothing as heard, so the retry sees no repeat."""
    a, b = instance(redis, "a"), instance(redis, "b")
    stop = asyncio.Event()

    async def evict():
        while not stop.is_set():
            await redis.delete("test-claims:room:" + ROOM)
            await asyncio.sleep(0)

    async def number(claims: RedisClaims, batch: list[str], expect: str) -> list:
        places = await claims.register(ROOM, [(t, True) for t in batch], expect)
        while places is None:
            places = await claims.register(ROOM, [(t, True) for t in batch])
        return places

    evictor = asyncio.ensure_future(evict())
    try:
        for round_ in range(4):
            (seed,) = await a.register(ROOM, [(f"seed{round_}", True)])
            batch = [f"r{round_}m{i}" for i in range(1500)]
            for places in await asyncio.gather(number(a, batch, seed.epoch), number(b, batch, seed.epoch)):
                assert not any(p.repeat for p in places)
                assert len({p.epoch for p in places}) == 1
                seqs = [p.seq for p in places]
                assert seqs == sorted(set(seqs)), seqs
    finally:
        stop.set()
        await evictor


async def test_a_message_numbered_out_of_order_starts_an_epoch_in_the_order_heard(redis):
    """m1's number is lost (its hash evicted) or m1 was never heard by the
    instance that numbered m2: the instance that holds m1 before m2 starts
    a new epoch in its own order, which the other joins; a message after one
    already done changes nothing (it is late whatever happens)."""
    a, b, c = instance(redis, "a"), instance(redis, "b"), instance(redis, "c")
    first = await a.register(ROOM, [("m1", True), ("m2", True)])
    await redis.delete("test-claims:msg:m1")
    # b numbers m1 alone, later than m2: noticed with m2, which is refused.
    (late,) = await b.register(ROOM, [("m1", True)])
    assert late.seq == 3
    assert await b.register(ROOM, [("m2", True)], late.epoch, late.seq) is None
    again = await b.register(ROOM, [("m1", False), ("m2", True)])
    assert [r.seq for r in again] == [1, 2] and again[0].epoch != first[0].epoch
    assert (await a.take(ROOM, first[0].epoch, 1)).status == EPOCH
    joined = await a.register(ROOM, [("m1", False), ("m2", False)])
    assert [(r.epoch, r.seq) for r in joined] == [(r.epoch, r.seq) for r in again]
    assert not any(r.repeat for r in again + joined)
    # In one batch: a message without a hash ahead of one numbered.
    await redis.delete("test-claims:msg:m1")
    reset = await b.register(ROOM, [("m1", False), ("m2", False)])
    assert [r.seq for r in reset] == [1, 2] and reset[0].epoch != again[0].epoch
    # A late subscriber numbered m4 alone, and it is done before m3 is numbered.
    (m4,) = await c.register(ROOM, [("m4", True)])
    assert m4.seq == 3
    assert (await c.take(ROOM, m4.epoch, 1)).status == OWNER
    for seq in (1, 2, 3):
        assert await c.finish(ROOM, m4.epoch, seq)
    tail = await b.register(ROOM, [("m3", True), ("m4", True)], reset[0].epoch, 2)
    assert [r.seq for r in tail] == [4, 3] and tail[0].epoch == m4.epoch
