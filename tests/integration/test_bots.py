"""The bots service against a real Matrix homeserver (Synapse, from the
session fixture), fed through real Redis exactly as Rails publishes, with the
rooms read back through the homeserver's client API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from channels_common.publish import publish_chatbot, publish_chatbot_test

from tests.integration.synapse import SERVER_NAME, MatrixUser, Synapse
from tests.support import ServiceProcess, free_port, until

# The test that first needs the homeserver pays for installing Synapse into
# its cache (about 45 s, longer on a slow network); the tests themselves bound
# every wait on their own.
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


class World:
    """Users and rooms on the session's homeserver, made once per module."""

    def __init__(self, synapse: Synapse):
        self.hs = synapse
        tag = uuid.uuid4().hex[:6]
        self.reader = synapse.register(f"reader{tag}")
        self.bots = [synapse.register(f"bot{i}{tag}") for i in range(2)]
        # No override: this bot gets the homeserver's hard message rate limit.
        self.limited = synapse.register(f"limited{tag}")
        synapse.unlimit(self.reader)
        for bot in self.bots:
            synapse.unlimit(bot)
        self.aliases = [f"#room{i}{tag}:{SERVER_NAME}" for i in range(3)]
        self.rooms = [synapse.create_room(self.reader, f"room{i}{tag}") for i in range(3)]
        for bot in (*self.bots, self.limited):
            for alias in self.aliases:
                synapse.join(bot, alias)
        # A room none of the bots is in.
        self.closed_alias = f"#closed{tag}:{SERVER_NAME}"
        self.closed_room = synapse.create_room(self.reader, f"closed{tag}")

    def read(self, room_id: str) -> list[dict]:
        return self.hs.messages(self.reader, room_id)

    def bodies(self, room_id: str, sender: MatrixUser | None = None) -> list[str]:
        return [
            e["content"]["body"]
            for e in self.read(room_id)
            if isinstance(e["content"].get("body"), str) and (sender is None or e["sender"] == sender.user_id)
        ]


@pytest.fixture(scope="module")
def world(synapse) -> World:
    return World(synapse)


@pytest.fixture
def bots(redis_url):
    """Starts the bots service; stopped (SIGTERM) after the test."""
    started: list[ServiceProcess] = []

    def start(**env) -> ServiceProcess:
        settings = {"REDIS_URL": redis_url, "LOG_LEVEL": "INFO", "BOTS_RETRY_BASE_SECONDS": "0.1", **env}
        started.append(ServiceProcess("channels-bots", free_port(), settings).start(ready=True))
        return started[-1]

    yield start
    for service in started:
        service.stop()


def at_least(count: int, items: list) -> list | None:
    return items if len(items) >= count else None


async def settled(service: ServiceProcess, expected: dict[str, float]) -> dict[str, float]:
    """The service's metrics once they show `expected`: a message can be seen
    in the room a moment before the service has counted it or closed its
    client."""
    await until(
        lambda: all(service.metrics().get(key) == value for key, value in expected.items()),
        10,
        interval=0.2, what=f"metrics {expected}",
    )
    return service.metrics()


def dropped_lines(service: ServiceProcess) -> list[dict]:
    lines = []
    for line in service.logs().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["msg"] in ("chatbot message dropped", "message not delivered"):
                lines.append(entry)
    return lines


async def test_a_test_message_arrives_as_a_notice_and_its_client_is_closed(world, bots, redis):
    service = bots()
    bot = world.bots[0]
    await publish_chatbot_test(redis, world.hs.url, bot.access_token, world.aliases[0], "Loomio says hello")
    events = await until(
        lambda: [e for e in world.read(world.rooms[0]) if e["content"].get("body") == "Loomio says hello"],
        timeout=30, interval=0.2, what="the test notice",
    )
    assert len(events) == 1
    assert events[0]["sender"] == bot.user_id
    assert events[0]["content"] == {"msgtype": "m.notice", "body": "Loomio says hello"}
    metrics = await settled(service, {'bots_messages_sent_total{kind="test"}': 1, "bots_open_clients": 0})
    assert metrics["bots_cached_clients"] == 0


async def test_a_publish_arrives_with_html_and_a_plain_text_body(world, bots, redis):
    service = bots()
    html = (
        '<p><strong>Jo</strong> started a thread: <a href="https://loomio.example/d/7">Budget 2027</a></p>'
        "<ul><li>Vote by Friday</li><li>Bring &amp; share</li></ul>"
    )
    await publish_chatbot(redis, world.hs.url, world.bots[1].access_token, world.rooms[1], html)
    events = await until(
        lambda: [e for e in world.read(world.rooms[1]) if e["content"].get("formatted_body") == html],
        timeout=30, interval=0.2, what="the published message",
    )
    content = events[0]["content"]
    assert events[0]["sender"] == world.bots[1].user_id
    assert content["msgtype"] == "m.text"
    assert content["format"] == "org.matrix.custom.html"
    assert content["body"] == (
        "Jo started a thread: Budget 2027 (https://loomio.example/d/7)\n\n- Vote by Friday\n- Bring & share"
    )
    assert service.metrics()["bots_cached_clients"] == 1


async def test_sixty_publishes_across_three_rooms_and_two_bots_arrive_in_order_once(world, bots, redis):
    service = bots()
    run = uuid.uuid4().hex[:6]
    expected: dict[str, list[str]] = {room: [] for room in world.rooms}
    for i in range(60):
        room_index, bot = i % 3, world.bots[(i // 3) % 2]
        body = f"{run}-{i:02d}"
        expected[world.rooms[room_index]].append(body)
        await publish_chatbot(redis, world.hs.url, bot.access_token, world.aliases[room_index], f"<p>{body}</p>")

    def ours(room_id: str) -> list[str]:
        return [b for b in world.bodies(room_id) if b.startswith(run)]

    await until(lambda: sum(len(ours(r)) for r in world.rooms) >= 60, 60, interval=0.2, what="60 messages")
    for room_id, bodies in expected.items():
        # Both bots post to every room; the room still sees Rails' order.
        assert ours(room_id) == bodies
    metrics = await settled(service, {'bots_messages_sent_total{kind="publish"}': 60})
    assert "bots_messages_failed_total" not in " ".join(metrics)
    assert metrics["bots_cached_clients"] == 2


async def test_a_hard_rate_limit_delays_but_loses_nothing(world, bots, redis):
    service = bots()
    run = uuid.uuid4().hex[:6]
    bodies = [f"{run}-{i:02d}" for i in range(10)]
    for body in bodies:
        await publish_chatbot(redis, world.hs.url, world.limited.access_token, world.aliases[1], body)
    got = await until(
        lambda: at_least(10, [x for x in world.bodies(world.rooms[1], world.limited) if x.startswith(run)]),
        timeout=90,
        interval=0.2, what="every rate-limited message",
    )
    assert got == bodies
    metrics = await settled(service, {'bots_messages_sent_total{kind="publish"}': 10})
    assert metrics['bots_messages_retried_total{reason="rate_limited"}'] > 0


async def test_wrong_token_unknown_alias_and_foreign_room_are_reported_and_later_messages_arrive(world, bots, redis):
    service = bots()
    bot = world.bots[0]
    wrong = "syt_not_a_real_token_" + uuid.uuid4().hex
    run = uuid.uuid4().hex[:6]
    await publish_chatbot(redis, world.hs.url, wrong, world.aliases[0], f"{run}-wrong-token")
    await publish_chatbot(redis, world.hs.url, bot.access_token, f"#nowhere{run}:{SERVER_NAME}", f"{run}-no-alias")
    await publish_chatbot(redis, world.hs.url, bot.access_token, world.closed_alias, f"{run}-not-joined")
    await publish_chatbot_test(redis, world.hs.url, wrong, world.aliases[0], f"{run}-test-wrong-token")
    await publish_chatbot(redis, world.hs.url, bot.access_token, world.aliases[0], f"<p>{run}-valid</p>")

    await until(lambda: f"{run}-valid" in world.bodies(world.rooms[0]), timeout=30, interval=0.2, what="the valid message")
    await until(lambda: len(dropped_lines(service)) >= 4, 10, interval=0.2, what="four failure reports")
    reasons = sorted(line["reason"] for line in dropped_lines(service))
    assert reasons == ["not_in_room", "unknown_alias", "unknown_token", "unknown_token"]
    assert not any(b.startswith(run) for b in world.bodies(world.closed_room))
    assert [b for b in world.bodies(world.rooms[0]) if b.startswith(run)] == [f"{run}-valid"]
    metrics = service.metrics()
    assert metrics['bots_messages_failed_total{reason="unknown_token"}'] == 2
    assert metrics['bots_messages_failed_total{reason="unknown_alias"}'] == 1
    assert metrics['bots_messages_failed_total{reason="not_in_room"}'] == 1
    # Permanent failures are not retried.
    assert not any(key.startswith("bots_messages_retried_total") for key in metrics)
    logs = service.logs()
    assert wrong not in logs and bot.access_token not in logs


async def test_malformed_payloads_are_logged_once_each_and_dropped(world, bots, redis):
    service = bots()
    bot = world.bots[1]
    run = uuid.uuid4().hex[:6]
    token = bot.access_token
    config = {"server": world.hs.url, "access_token": token, "channel": world.aliases[2]}
    bad = [
        ("chatbot/publish", b"{not json"),
        ("chatbot/publish", b"\xff\xfe\x00"),
        ("chatbot/publish", b"[]"),
        ("chatbot/publish", json.dumps({"config": config}).encode()),
        ("chatbot/publish", json.dumps({"config": {**config, "channel": "general"},
                                        "payload": {"html": "x"}}).encode()),
        ("chatbot/publish", json.dumps({"config": {**config, "server": "file:///etc/passwd"},
                                        "payload": {"html": "x"}}).encode()),
        ("chatbot/test", json.dumps({"server": world.hs.url, "access_token": token, "message": "m"}).encode()),
        ("chatbot/test", json.dumps({**config, "message": ["not", "text"]}).encode()),
        ("chatbot/delete_everything", json.dumps({**config, "message": "m"}).encode()),
        ("chatbot/publish", b"x" * 300_000),
        ("chatbot/publish", b"[" * 100_000),  # nested past the parser's recursion limit
    ]
    for channel, data in bad:
        await redis.publish(channel, data)
    await publish_chatbot(redis, world.hs.url, token, world.aliases[2], f"{run}-after the junk")

    await until(lambda: f"{run}-after the junk" in world.bodies(world.rooms[2]), timeout=30, interval=0.2, what="the valid message")
    lines = dropped_lines(service)
    assert len(lines) == len(bad)
    assert sorted(line["reason"] for line in lines) == sorted(
        ["not_json", "not_json", "not_json", "incomplete", "incomplete", "invalid", "invalid", "incomplete", "incomplete",
         "unknown_channel", "too_large"]
    )
    assert token not in service.logs()
    metrics = await settled(service, {"bots_pending_messages": 0})
    assert metrics['bots_messages_received_total{channel="other"}'] == 1
    assert metrics['bots_messages_received_total{channel="chatbot/publish"}'] == 9
    assert metrics['bots_messages_received_total{channel="chatbot/test"}'] == 2
    assert metrics['bots_messages_failed_total{reason="not_json"}'] == 3
    assert service.process.poll() is None


async def test_the_client_cache_stays_within_its_bound_under_many_configs(world, bots, redis):
    service = bots(BOTS_CLIENT_CACHE_SIZE="3")
    run = uuid.uuid4().hex[:6]
    # Ten access tokens of one user: ten distinct configs, as ten Loomio groups would have.
    tokens = [world.hs.login(world.bots[0]) for _ in range(10)]
    peak = 0
    for i, token in enumerate(tokens):
        await publish_chatbot(redis, world.hs.url, token, world.aliases[i % 3], f"{run}-{i}")
        peak = max(peak, service.metrics()["bots_cached_clients"])

    def arrived() -> int:
        return sum(1 for room in world.rooms for b in world.bodies(room) if b.startswith(run))

    deadline = time.monotonic() + 30
    while arrived() < 10:
        assert time.monotonic() < deadline, "timed out waiting for 10 messages"
        peak = max(peak, service.metrics()["bots_cached_clients"])
        await asyncio.sleep(0.1)
    metrics = await settled(service, {"bots_open_clients": 3})
    assert peak <= 3
    assert metrics["bots_cached_clients"] == 3
    assert metrics['bots_clients_evicted_total{cause="lru"}'] == 7
