"""The Matrix adapter with real matrix-nio clients against the stand-in
homeserver (conftest.py): how each answer is classified, the alias cache,
the client cache's bounds, and retries that never post twice."""

from __future__ import annotations

import asyncio

import pytest
from channels_bots.dispatcher import Dispatcher, RetryPolicy
from channels_bots.errors import Permanent, RateLimited, Transient
from channels_bots.matrix import AliasCache, ClientCache, Matrix, make_client
from channels_bots.messages import Bot, Command
from channels_bots.metrics import BotsMetrics

from tests.support import FakeClock

ROOM = "!room1:localhost"


def A(status, body=None):
    return {"status": status, "body": body}

ALIAS = "#general:localhost"


def cmd(server: str, room: str = ALIAS, body: str = "hello", token: str = "tok-1", kind: str = "publish"):
    return Command(kind, Bot(server, token), room, {"msgtype": "m.text", "body": body},
                   f"txn-{kind}-{token}-{room}-{body}")


def gateway(ttl: float = 300.0, size: int = 10, clock=None) -> Matrix:
    clock = clock or FakeClock(1000.0)
    return Matrix(ClientCache(max_size=size, idle_seconds=60, clock=clock), AliasCache(ttl=ttl, clock=clock))


async def deliver(matrix: Matrix, command: Command) -> str:
    async with matrix.lease(command) as client:
        return await matrix.deliver(client, command)


@pytest.fixture
def hs(homeserver):
    homeserver.add_bot("tok-1", ROOM)
    homeserver.aliases[ALIAS] = ROOM
    return homeserver


async def test_sends_through_an_alias_and_caches_the_resolution(hs):
    matrix = gateway()
    try:
        assert (await deliver(matrix, cmd(hs.url, body="one"))).startswith("$")
        await deliver(matrix, cmd(hs.url, body="two"))
        assert hs.bodies(ROOM) == ["one", "two"]
        assert hs.count("resolve") == 1
    finally:
        await matrix.clients.close()


async def test_alias_resolution_expires_after_its_ttl(hs):
    clock = FakeClock(1000.0)
    matrix = gateway(ttl=30, clock=clock)
    try:
        await deliver(matrix, cmd(hs.url))
        clock.now += 31
        await deliver(matrix, cmd(hs.url))
        assert hs.count("resolve") == 2
    finally:
        await matrix.clients.close()


async def test_room_ids_are_used_as_given(hs):
    matrix = gateway()
    try:
        await deliver(matrix, cmd(hs.url, room=ROOM))
        assert hs.count("resolve") == 0 and hs.bodies(ROOM) == ["hello"]
    finally:
        await matrix.clients.close()


@pytest.mark.parametrize(
    "call, answer, error, reason",
    [
        ("send", A(502, b"<html>bad gateway</html>"), Transient, "server_error"),
        ("send", A(500, {"errcode": "M_UNKNOWN", "error": "boom"}), Transient, "server_error"),
        ("resolve", A(503, b"busy"), Transient, "server_error"),
        ("send", A(200, b"<html>captive portal</html>"), Transient, "bad_response"),
        ("send", {"status": 0, "drop": True}, Transient, "network"),
        ("send", A(429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 1234}),
         RateLimited, "rate_limited"),
        ("send", A(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"}), Permanent, "unknown_token"),
        ("resolve", A(404, {"errcode": "M_NOT_FOUND", "error": "no alias"}), Permanent, "unknown_alias"),
        ("send", A(403, {"errcode": "M_FORBIDDEN", "error": "not in room"}), Permanent, "not_in_room"),
        ("send", A(413, {"errcode": "M_TOO_LARGE", "error": "big"}), Permanent, "rejected"),
    ],
)
async def test_answers_are_classified(hs, call, answer, error, reason):
    # aiohttp repeats an idempotent request once when a reused connection
    # drops, so a dropped connection is scripted twice.
    hs.fail(call, *[hs.answer(**answer)] * (2 if answer.get("drop") else 1))
    matrix = gateway()
    try:
        with pytest.raises(error) as caught:
            await deliver(matrix, cmd(hs.url))
        assert caught.value.reason == reason
        if isinstance(caught.value, RateLimited):
            assert caught.value.retry_after == pytest.approx(1.234)
        assert hs.bodies() == []
    finally:
        await matrix.clients.close()


async def test_an_unreachable_homeserver_is_a_network_error():
    from tests.support import free_port

    matrix = gateway()
    with pytest.raises(Transient) as caught:
        await deliver(matrix, cmd(f"http://127.0.0.1:{free_port()}", room=ROOM))
    assert caught.value.reason == "network"
    await matrix.clients.close()


async def test_an_unknown_token_evicts_its_client(hs):
    matrix = gateway()
    bad = cmd(hs.url, token="wrong")
    with pytest.raises(Permanent):
        await deliver(matrix, bad)
    assert len(matrix.clients) == 0 and matrix.clients.open_clients == 0


async def test_a_failed_send_through_an_alias_forgets_the_resolution(hs):
    matrix = gateway()
    await deliver(matrix, cmd(hs.url))
    hs.fail("send", hs.answer(403, {"errcode": "M_FORBIDDEN", "error": "not in room"}))
    with pytest.raises(Permanent):
        await deliver(matrix, cmd(hs.url))
    await deliver(matrix, cmd(hs.url))
    assert hs.count("resolve") == 2
    await matrix.clients.close()


async def test_retries_reuse_the_transaction_id_so_nothing_posts_twice(hs):
    """The homeserver stores the event but the answer is lost (a 502 from a
    proxy, then a 429): the retries repeat the same transaction, which the
    homeserver recognises, so the room gets the message once."""
    hs.fail(
        "send",
        hs.answer(502, b"gateway", after_work=True),
        hs.answer(429, {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 10}),
    )
    metrics = BotsMetrics()
    matrix = gateway()
    dispatcher = Dispatcher(matrix, policy=RetryPolicy(base_delay=0.01), metrics=metrics)
    command = cmd(hs.url, body="exactly once")
    dispatcher.submit(command)
    while dispatcher.pending:
        await asyncio.sleep(0.01)
    sends = [key for call, key in hs.requests if call == "send"]
    assert sends == [command.txn_id] * 3
    assert hs.bodies() == ["exactly once"]
    assert metrics.registry.get_sample_value("bots_messages_sent_total", {"kind": "publish"}) == 1
    assert metrics.registry.get_sample_value("bots_messages_retried_total", {"reason": "server_error"}) == 1
    assert metrics.registry.get_sample_value("bots_messages_retried_total", {"reason": "rate_limited"}) == 1
    await matrix.clients.close()


async def test_a_transaction_repeated_after_success_is_not_posted_again(hs):
    matrix = gateway()
    command = cmd(hs.url, body="once")
    first = await deliver(matrix, command)
    second = await deliver(matrix, command)
    assert first == second and hs.bodies() == ["once"]
    await matrix.clients.close()


# -- the client cache -------------------------------------------------------------


class FakeClient:
    def __init__(self, bot):
        self.bot = bot
        self.closed = False

    async def close(self):
        self.closed = True


def test_make_client_does_not_retry_by_itself():
    client = make_client(Bot("https://hs.example", "tok"))
    assert client.config.max_limit_exceeded == 0 and client.config.max_timeouts == 0
    assert client.access_token == "tok" and client.olm is None


async def test_lru_bound_holds_and_evicted_clients_are_closed():
    made: list[FakeClient] = []
    evictions: list[str] = []

    def factory(bot):
        made.append(FakeClient(bot))
        return made[-1]

    cache = ClientCache(max_size=3, idle_seconds=60, factory=factory, on_evict=evictions.append)
    bots = [Bot("https://hs.example", f"token-{i}") for i in range(10)]
    for bot in bots:
        async with cache.lease(bot):
            pass
        assert len(cache) <= 3
    assert len(cache) == 3 and evictions == ["lru"] * 7
    assert [c.closed for c in made] == [True] * 7 + [False] * 3
    # The most recently used stay; using one again makes it newest.
    async with cache.lease(bots[7]) as client:
        assert client is made[7]
    async with cache.lease(bots[0]):
        pass
    assert made[8].closed and not made[7].closed
    await cache.close()
    assert all(c.closed for c in made)


async def test_a_client_in_use_is_closed_only_when_given_back():
    made: list[FakeClient] = []
    cache = ClientCache(max_size=1, idle_seconds=60, factory=lambda b: made.append(FakeClient(b)) or made[-1])
    a, b = Bot("https://hs", "a"), Bot("https://hs", "b")
    async with cache.lease(a) as client_a, cache.lease(b):
        assert len(cache) == 1 and cache.open_clients == 2
        assert not client_a.closed
    assert client_a.closed and cache.open_clients == 1
    await cache.close()


async def test_idle_clients_are_swept():
    clock = FakeClock(1000.0)
    made: list[FakeClient] = []
    cache = ClientCache(max_size=10, idle_seconds=60, clock=clock,
                        factory=lambda b: made.append(FakeClient(b)) or made[-1])
    async with cache.lease(Bot("https://hs", "old")):
        pass
    clock.now += 50
    async with cache.lease(Bot("https://hs", "new")):
        pass
    clock.now += 20
    assert await cache.sweep() == 1
    assert made[0].closed and not made[1].closed and len(cache) == 1
    await cache.close()


async def test_fresh_clients_are_closed_after_use_and_never_cached():
    made: list[FakeClient] = []
    cache = ClientCache(max_size=10, idle_seconds=60, factory=lambda b: made.append(FakeClient(b)) or made[-1])
    bot = Bot("https://hs", "t")
    async with cache.lease(bot, fresh=True) as first:
        assert cache.open_clients == 1
    async with cache.lease(bot, fresh=True) as second:
        pass
    assert first is not second and first.closed and second.closed
    assert len(cache) == 0 and cache.open_clients == 0


async def test_a_cache_of_size_zero_still_closes_every_client():
    made: list[FakeClient] = []
    cache = ClientCache(max_size=0, idle_seconds=60, factory=lambda b: made.append(FakeClient(b)) or made[-1])
    async with cache.lease(Bot("https://hs", "a")) as client:
        assert not client.closed
    assert client.closed and len(cache) == 0 and cache.open_clients == 0
