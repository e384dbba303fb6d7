"""Several dispatchers sharing rooms through claims in a real Redis, with a
stand-in homeserver that, like Matrix, posts a transaction id once: each
message once, in order, whoever posts it; identical publishes within the
window count once; and the keep bounds (count, bytes, age), each counted."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from channels_bots.claims import LocalClaims, RedisClaims
from channels_bots.dispatcher import Dispatcher
from channels_bots.messages import Bot, Command
from channels_bots.metrics import BotsMetrics

from tests.support import FakeClock


class Homeserver:
    """Posts each transaction id once (a repeat gets the first event back)."""

    def __init__(self, delay: float = 0.001):
        self.delay = delay
        self.rooms: dict[str, list[str]] = {}
        self.txns: set[str] = set()
        self.requests = 0

    @contextlib.asynccontextmanager
    async def lease(self, command):
        yield None

    async def deliver(self, client, command: Command) -> str:
        self.requests += 1
        await asyncio.sleep(self.delay)
        if command.txn_id not in self.txns:
            self.txns.add(command.txn_id)
            self.rooms.setdefault(command.room, []).append(command.content["body"])
        return "$event"


def message(room: str, body: str, txn: str | None = None) -> Command:
    return Command("publish", Bot("https://hs.example", "tok"), room, {"body": body}, txn or f"t-{room}-{body}")


def value(metrics: BotsMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def settled(*dispatchers: Dispatcher, timeout: float = 10.0) -> None:
    async def empty():
        while any(d.pending for d in dispatchers):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(empty(), timeout)


def instance(redis, homeserver, name: str, prefix: str, lease: float = 0.5, **options) -> tuple[Dispatcher, BotsMetrics]:
    metrics = BotsMetrics()
    claims = RedisClaims(redis, instance=name, prefix=prefix, lease=lease, window=60.0)
    return Dispatcher(homeserver, claims=claims, metrics=metrics, **options), metrics


async def test_two_instances_hearing_everything_post_each_message_once_in_order(redis):
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    hs = Homeserver()
    (a, ma), (b, mb) = instance(redis, hs, "a", prefix, lease=2.0), instance(redis, hs, "b", prefix, lease=2.0)
    rooms = [f"#r{i}:x" for i in range(4)]
    for i in range(100):
        command = message(rooms[i % 4], f"m{i:03d}")
        a.submit(command)
        b.submit(command)
    await settled(a, b)
    for n, room in enumerate(rooms):
        assert hs.rooms[room] == [f"m{i:03d}" for i in range(n, 100, 4)]
    assert hs.requests == 100
    assert value(ma, "bots_messages_claimed_total") + value(mb, "bots_messages_claimed_total") == 100
    await a.close(1)
    await b.close(1)


async def test_identical_publishes_within_the_window_count_once(redis):
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    hs = Homeserver()
    (a, ma), (b, mb) = instance(redis, hs, "a", prefix, lease=2.0), instance(redis, hs, "b", prefix, lease=2.0)
    twice = message("#r:x", "same", txn="lc1-same")
    for command in (message("#r:x", "before"), twice, twice, message("#r:x", "after")):
        a.submit(command)
        b.submit(command)
    await settled(a, b)
    # The repeat arrives later too: it is still the same message.
    a.submit(twice)
    b.submit(twice)
    await settled(a, b)
    assert hs.rooms["#r:x"] == ["before", "same", "after"]
    assert hs.requests == 3
    assert value(ma, "bots_messages_deduplicated_total") == value(mb, "bots_messages_deduplicated_total") == 2
    await a.close(1)
    await b.close(1)


async def test_an_owner_cut_off_from_redis_loses_its_room_and_the_other_posts_in_order(redis):
    """The owner is stuck in a send and can no longer reach Redis (as a dead
    or frozen process): its attempt is cut off before its lease could lapse,
    and after the lease the other instance takes the room over from the head."""
    prefix = f"t{uuid.uuid4().hex[:6]}:"
    hs = Homeserver()
    a, ma = instance(redis, hs, "a", prefix, lease=0.3)
    b, mb = instance(redis, hs, "b", prefix, lease=0.3)
    cut_off = asyncio.Event()

    class Stuck(Homeserver):
        async def deliver(self, client, command):
            cut_off.set()
            await asyncio.sleep(3600)

    async def unreachable(*args, **kwargs):
        await asyncio.sleep(3600)

    a.transport = Stuck()
    a.submit(message("#r:x", "m0"))
    await asyncio.wait_for(cut_off.wait(), 5)
    for name in ("register", "take", "renew", "finish", "release"):
        setattr(a.claims, name, unreachable)
    for i in range(6):
        command = message("#r:x", f"m{i}")
        if i:
            a.submit(command)
        b.submit(command)
    await settled(b)
    assert hs.rooms["#r:x"] == [f"m{i}" for i in range(6)]
    assert value(ma, "bots_messages_claimed_total") == 1
    assert value(mb, "bots_messages_taken_over_total") == 6
    await b.close(1)
    for task in list(a._workers.values()):
        task.cancel()


async def test_keep_bounds_count_bytes_and_age_are_each_counted():
    gate = asyncio.Event()

    class Hanging(Homeserver):
        async def deliver(self, client, command):
            await gate.wait()
            return "$e"

    clock = FakeClock(100.0)
    metrics = BotsMetrics()
    dispatcher = Dispatcher(Hanging(), claims=LocalClaims(clock=clock), metrics=metrics, max_pending=4,
                            max_pending_bytes=250, max_pending_age=60.0, clock=clock)
    assert dispatcher.submit(message("#a:x", "1"), size=100)
    assert dispatcher.submit(message("#b:x", "2"), size=100)
    assert not dispatcher.submit(message("#c:x", "3"), size=100)  # 300 bytes > 250
    assert dispatcher.submit(message("#c:x", "4"), size=10)
    assert dispatcher.submit(message("#a:x", "5"), size=1)  # waits behind "1"
    assert not dispatcher.submit(message("#d:x", "6"), size=1)  # a fifth message
    assert dispatcher.pending == 4 and dispatcher.pending_bytes == 211
    await asyncio.sleep(0.05)
    clock.advance(61)
    assert dispatcher.oldest_age() >= 61
    # The three in flight are spared; the one waiting is not.
    assert dispatcher.expire() == 1
    assert dispatcher.pending == 3
    for reason in ("count", "bytes", "age"):
        assert value(metrics, "bots_messages_given_up_total", reason=reason) == 1
    gate.set()
    await settled(dispatcher)
    await dispatcher.close(1)


async def test_on_an_allkeys_lru_redis_evicted_claims_repeat_but_never_lose():
    """A Redis so small that it evicts while two instances share the rooms
    and something else fills it: every message is posted, in order per room;
    a repeat (from a lost done mark) reaches the homeserver as the same
    transaction, which posts it once."""
    import redis.asyncio as aioredis
    from channels_dev.redis_server import start_local_redis

    server = start_local_redis(extra_args=("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"))
    client = aioredis.Redis.from_url(server.url)
    try:
        hs = Homeserver(delay=0.002)
        (a, _), (b, _) = instance(client, hs, "a", "bots:"), instance(client, hs, "b", "bots:")
        rooms = [f"#r{i}:x" for i in range(3)]
        filler = 0

        async def fill(n: int) -> None:
            nonlocal filler
            pipe = client.pipeline(transaction=False)
            for _ in range(n):
                pipe.set(f"junk:{filler}", b"x" * 2000)
                filler += 1
            await pipe.execute()

        for i in range(300):
            command = message(rooms[i % 3], f"m{i:03d}")
            a.submit(command)
            b.submit(command)
            if i % 10 == 0:
                await fill(200)
                await asyncio.sleep(0.005)
        await settled(a, b, timeout=60)
        info = await client.info("stats")
        assert info["evicted_keys"] > 0
        for n, room in enumerate(rooms):
            want, got = [f"m{i:03d}" for i in range(n, 300, 3)], hs.rooms[room]
            # Lost, doubled or reordered: the whole sequence says which.
            assert got == want, (f"{room}: missing {sorted(set(want) - set(got))}, "
                                 f"doubled {len(got) - len(set(got))}, posted {got}")
        await a.close(1)
        await b.close(1)
    finally:
        await client.aclose()
        server.cleanup()
