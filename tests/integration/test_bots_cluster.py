"""Several bots instances on one Redis against the real Synapse: every
message posted exactly once, in publish order per room, through SIGKILLs
(at random points, with a send in flight, with a slow homeserver), a rolling
restart and a Redis restart. The bots reach Synapse through a stand-in proxy
that can delay answers and hold one send in flight."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis.asyncio as aioredis
from channels_bots.claims import room_id
from redis.exceptions import RedisError

from tests.integration.synapse import SERVER_NAME, Synapse
from tests.support import ServiceProcess, free_port, until

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MESSAGES = 300
ROOMS = 5
# Short leases keep takeovers quick in tests (production: 10 s).
SETTINGS = {
    "LOG_LEVEL": "INFO",
    "BOTS_CLAIM_LEASE_SECONDS": "1.0",
    "BOTS_SETTLE_SECONDS": "0.5",
    "BOTS_RETRY_BASE_SECONDS": "0.1",
    "BOTS_REQUEST_TIMEOUT_SECONDS": "10",
    "SHUTDOWN_GRACE_SECONDS": "10",
}


class Proxy:
    """Forwards the client API to Synapse; `delay` holds every answer back,
    `hold_at` keeps the n-th send from going on until `release` is set."""

    def __init__(self, upstream: str, delay: float = 0.0, hold_at: int | None = None):
        self.upstream = upstream
        self.delay = delay
        self.hold_at = hold_at
        self.held = threading.Event()
        self.release = threading.Event()
        self.held_path: str | None = None
        self.sends = 0
        self.lock = threading.Lock()
        # One pool of kept-alive connections to Synapse for every thread.
        self.client = httpx.Client(base_url=upstream, timeout=30, limits=httpx.Limits(max_connections=50))
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._forward(self, "GET")

            def do_PUT(self):
                proxy._forward(self, "PUT")

            def do_POST(self):
                proxy._forward(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.client.close()

    def _forward(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if method == "PUT" and "/send/" in request.path:
            with self.lock:
                self.sends += 1
                hold = self.sends == self.hold_at
            if hold:
                self.held_path = request.path
                self.held.set()
                self.release.wait(60)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            answer = self.client.request(method, request.path, headers=headers, content=body)
        except httpx.HTTPError:
            request.close_connection = True
            return
        if self.delay:
            time.sleep(self.delay)
        try:
            request.send_response(answer.status_code)
            request.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
            request.send_header("Content-Length", str(len(answer.content)))
            request.end_headers()
            request.wfile.write(answer.content)
        except OSError:
            pass  # the instance that asked is gone


class World:
    def __init__(self, synapse: Synapse):
        self.hs = synapse
        tag = uuid.uuid4().hex[:6]
        self.reader = synapse.register(f"creader{tag}")
        self.bot = synapse.register(f"cbot{tag}")
        synapse.unlimit(self.reader)
        synapse.unlimit(self.bot)
        self.aliases = [f"#croom{i}{tag}:{SERVER_NAME}" for i in range(ROOMS)]
        self.rooms = [synapse.create_room(self.reader, f"croom{i}{tag}") for i in range(ROOMS)]
        for alias in self.aliases:
            synapse.join(self.bot, alias)

    def bodies(self, room: str, run: str) -> list[str]:
        return [e["content"]["body"] for e in self.hs.messages(self.reader, room)
                if str(e["content"].get("body", "")).startswith(run)]


@pytest.fixture(scope="module")
def world(synapse) -> World:
    return World(synapse)


@pytest.fixture
def proxies(synapse):
    made: list[Proxy] = []

    def make(**options) -> Proxy:
        made.append(Proxy(synapse.url, **options))
        return made[-1]

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture
def cluster():
    """Starts bots instances; whatever is left is stopped after the test."""
    started: list[ServiceProcess] = []

    def start(redis_url: str) -> ServiceProcess:
        started.append(ServiceProcess("channels-bots", free_port(), {**SETTINGS, "REDIS_URL": redis_url}).start(
            ready=True))
        return started[-1]

    yield start
    for service in started:
        if service.process.poll() is None:
            service.kill()


class Stream:
    """Publishes (300) over 5 rooms, paced so that kills land mid-stream;
    `published` keeps, per room, the bodies some instance received."""

    def __init__(self, world: World, server: str, redis_url: str, count: int = MESSAGES):
        self.count = count
        self.world = world
        self.server = server
        self.redis_url = redis_url
        self.run = uuid.uuid4().hex[:8]
        self.published: dict[str, list[str]] = {room: [] for room in world.rooms}
        self.unheard = 0  # published while no instance was subscribed
        self.failed = 0  # not published: Redis was down

    def body(self, i: int) -> str:
        return f"{self.run}-{i % ROOMS}-{i:03d}"

    async def play(self, actions: dict[int, object] | None = None, pace: float = 0.004) -> None:
        actions = actions or {}
        client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            for i in range(self.count):
                if i in actions:
                    result = actions[i]()
                    if asyncio.iscoroutine(result):
                        await result
                room = i % ROOMS
                payload = {"config": {"server": self.server, "access_token": self.world.bot.access_token,
                                      "channel": self.world.aliases[room]},
                           "payload": {"html": f"<p>{self.body(i)}</p>"}}
                try:
                    receivers = await client.publish("chatbot/publish", json.dumps(payload))
                except (RedisError, OSError):
                    self.failed += 1
                else:
                    if receivers:
                        self.published[self.world.rooms[room]].append(self.body(i))
                    else:
                        self.unheard += 1
                await asyncio.sleep(pace)
        finally:
            await client.aclose()

    async def check(self, survivors: list[ServiceProcess]) -> None:
        """Once every survivor has nothing left to post, each room holds
        exactly what was published to it, once each, in publish order."""
        await until(lambda: all(s.metrics().get("bots_pending_messages") == 0 for s in survivors),
                    90, interval=0.3, what="every instance done")
        for room, expected in self.published.items():
            got = self.world.bodies(room, self.run)
            assert got == expected, _difference(expected, got)


def _difference(expected: list[str], got: list[str]) -> str:
    missing = [b for b in expected if b not in got]
    doubled = sorted({b for b in got if got.count(b) > 1})
    return f"missing {missing[:10]} ({len(missing)}), doubled {doubled[:10]} ({len(doubled)}), order differs"


def total(services: list[ServiceProcess], name: str) -> float:
    return sum(s.metrics().get(name, 0.0) for s in services)


async def owner_of(redis_url: str, server: str, alias: str) -> str | None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        owner = await client.hget(f"bots:room:{room_id(server, alias)}", "o")
    finally:
        await client.aclose()
    return owner.decode() if owner else None


def by_instance(instances: list[ServiceProcess], owner: str | None) -> ServiceProcess | None:
    if not owner:
        return None
    pid = int(owner.split(":")[-2])
    return next((s for s in instances if s.process.pid == pid), None)


async def test_two_instances_post_300_messages_over_5_rooms_once_each_in_order(world, proxies, cluster, redis_url):
    proxy = proxies()
    a, b = cluster(redis_url), cluster(redis_url)
    stream = Stream(world, proxy.url, redis_url)
    await stream.play()
    await stream.check([a, b])
    assert stream.unheard == stream.failed == 0
    assert total([a, b], 'bots_messages_sent_total{kind="publish"}') == MESSAGES
    assert total([a, b], "bots_messages_claimed_total") == MESSAGES
    assert proxy.sends == MESSAGES
    for service in (a, b):
        assert "bots_messages_given_up_total" not in " ".join(service.metrics())


async def test_sigkills_of_one_of_two_instances_at_random_points(world, proxies, cluster, redis_url):
    """Two kills in one stream, each of the owner of a random room: the first
    one's replacement starts at once; the second comes once everything
    published so far is posted (until then the survivor alone held what came
    before the replacement): the guarantee covers one death at a time."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    proxy = proxies()
    instances = [cluster(redis_url), cluster(redis_url)]
    stream = Stream(world, proxy.url, redis_url)
    killed: list[ServiceProcess] = []

    async def kill():
        owner = await owner_of(redis_url, proxy.url, world.aliases[rng.randrange(ROOMS)])
        alive = [s for s in instances if s not in killed]
        victim = by_instance(alive, owner) or rng.choice(alive)
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)
        killed.append(victim)

    async def kill_and_replace():
        await kill()
        instances.append(cluster(redis_url))  # publishing waits until it is subscribed

    first, second = rng.randrange(30, 130), rng.randrange(170, MESSAGES - 30)

    async def catch_up_then_kill():
        published = {room: list(bodies) for room, bodies in stream.published.items()}
        await until(lambda: all(stream.world.bodies(room, stream.run)[: len(bodies)] == bodies
                                for room, bodies in published.items()), 60, interval=0.3, what="catching up")
        await kill()

    await stream.play({first: kill_and_replace, second: catch_up_then_kill})
    survivors = [s for s in instances if s not in killed]
    assert len(killed) == 2 and len(survivors) == 1, f"seed {seed}"
    await stream.check(survivors)


async def test_sigkill_while_a_send_is_in_flight_to_a_slow_homeserver(world, proxies, cluster, redis_url):
    # Every answer comes 50 ms late, and the 100th send is held until the
    # instance that made it is dead; then it reaches the homeserver anyway.
    proxy = proxies(delay=0.05, hold_at=100)
    instances = [cluster(redis_url), cluster(redis_url)]
    stream = Stream(world, proxy.url, redis_url)
    done = {}

    async def kill_the_sender():
        await asyncio.to_thread(proxy.held.wait, 30)
        room = urllib.parse.unquote(proxy.held_path.split("/rooms/")[1].split("/")[0])
        alias = world.aliases[world.rooms.index(room)]
        sender = by_instance(instances, await owner_of(redis_url, proxy.url, alias))
        assert sender is not None, "the room of the send in flight has its sender as owner"
        sender.signal(signal.SIGKILL)
        sender.process.wait(10)
        done["killed"] = sender
        # What the dead instance had on the wire reaches the homeserver late.
        threading.Timer(1.5, proxy.release.set).start()

    await stream.play({150: kill_the_sender})
    (survivor,) = [s for s in instances if s is not done["killed"]]
    await stream.check([survivor])
    assert survivor.metrics()["bots_messages_taken_over_total"] >= 1
    # The held send reached the homeserver and the survivor sent it again:
    # one more request than messages, and still one event (checked above).
    assert proxy.sends >= MESSAGES + 1


async def test_a_rolling_restart_loses_and_doubles_nothing(world, proxies, cluster, redis_url):
    proxy = proxies(delay=0.01)
    old = cluster(redis_url)
    stream = Stream(world, proxy.url, redis_url, count=150)
    new: list[ServiceProcess] = []

    def start_new():
        new.append(cluster(redis_url))

    def stop_old():
        old.signal(signal.SIGTERM)

    await stream.play({40: start_new, 80: stop_old})
    assert old.process.wait(20) == 0
    await stream.check(new)
    assert stream.unheard == 0


async def test_a_redis_restart_loses_only_what_was_published_while_it_was_down(
        world, proxies, cluster, private_redis):
    proxy = proxies(delay=0.01)
    instances = [cluster(private_redis.url), cluster(private_redis.url)]
    stream = Stream(world, proxy.url, private_redis.url, count=150)

    back: list[asyncio.Task] = []

    async def start_again():
        await asyncio.sleep(0.5)
        await asyncio.to_thread(private_redis.start)

    def restart():
        # Publishing goes on meanwhile: those publishes fail.
        private_redis.kill()
        back.append(asyncio.ensure_future(start_again()))

    await stream.play({60: restart}, pace=0.01)
    await back[0]
    await stream.check(instances)
    assert stream.failed > 0
    assert sum(len(v) for v in stream.published.values()) + stream.failed + stream.unheard == stream.count
    for service in instances:
        assert service.metrics()["bots_redis_reconnects_total"] == 1


async def test_identical_publishes_within_the_window_are_one_message(world, proxies, cluster, redis_url, redis):
    proxy = proxies()
    instances = [cluster(redis_url), cluster(redis_url)]
    run = uuid.uuid4().hex[:8]
    room, alias = world.rooms[0], world.aliases[0]
    token = world.bot.access_token
    for body in ("first", "again", "again", "again", "last"):
        payload = {"config": {"server": proxy.url, "access_token": token, "channel": alias},
                   "payload": {"html": f"<p>{run}-{body}</p>"}}
        assert await redis.publish("chatbot/publish", json.dumps(payload)) == 2
    await until(lambda: all(s.metrics().get("bots_pending_messages") == 0 for s in instances), 30,
                interval=0.2, what="both done")
    assert world.bodies(room, run) == [f"{run}-first", f"{run}-again", f"{run}-last"]
    # Each instance heard the repeat twice more, and counted it.
    assert [s.metrics()["bots_messages_deduplicated_total"] for s in instances] == [2, 2]
    assert proxy.sends == 3
