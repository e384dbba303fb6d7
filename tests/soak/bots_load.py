"""bots under the soak: numbered chatbot/publish messages to a few rooms of
a real Synapse, and the invariant: each one posted exactly once, in order
per room (read back through the homeserver's client API)."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from itertools import pairwise

import redis as redis_sync

from tests.integration.synapse import SERVER_NAME, Synapse


@dataclass
class BotsFigures:
    expected: int = 0
    once: int = 0
    missing: int = 0
    doubled: int = 0
    disordered: int = 0
    problems: list[str] = field(default_factory=list)


class BotsLoad:
    ROOMS = 3

    def __init__(self, synapse: Synapse, redis_url: str, rate: float, seed: int):
        self.hs = synapse
        self.redis_url = redis_url
        self.rate = rate
        self.rng = random.Random(seed ^ 0xB075)
        self.tag = uuid.uuid4().hex[:6]
        self.stop_event = threading.Event()
        self.published: dict[int, int] = {}
        self.times: dict[tuple[int, int], float] = {}  # (room, n) -> monotonic time published
        self.t0 = time.monotonic()
        self.uncertain: set[tuple[int, int]] = set()

    def setup(self) -> None:
        hs, tag = self.hs, self.tag
        self.reader = hs.register(f"soakreader{tag}")
        self.bot = hs.register(f"soakbot{tag}")
        hs.unlimit(self.reader)
        hs.unlimit(self.bot)
        self.aliases = [f"#soak{i}{tag}:{SERVER_NAME}" for i in range(self.ROOMS + 1)]
        self.rooms = [hs.create_room(self.reader, f"soak{i}{tag}") for i in range(self.ROOMS + 1)]
        for alias in self.aliases:
            hs.join(self.bot, alias)
        # The last room takes the hostile renders; its content is not checked.
        self.junk_alias = self.aliases[-1]

    def payload(self, alias: str, html: str, token: str | None = None) -> str:
        return json.dumps({"config": {"server": self.hs.url, "access_token": token or self.bot.access_token,
                                      "channel": alias}, "payload": {"html": html}})

    def publish_loop(self) -> None:
        r = redis_sync.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        while not self.stop_event.is_set():
            self.publish_one(r, self.rng.randrange(self.ROOMS))
            time.sleep(self.rng.expovariate(self.rate))
        r.close()

    def publish_one(self, r: redis_sync.Redis, room: int) -> None:
        n = self.published.get(room, 0) + 1
        data = self.payload(self.aliases[room], f"<p>soak <b>{self.tag}</b> {room} {n:05d}</p>")
        while True:
            try:
                if r.publish("chatbot/publish", data) > 0:
                    break
            except redis_sync.RedisError:
                self.uncertain.add((room, n))
            time.sleep(0.1)
        self.published[room] = n
        self.times[(room, n)] = time.monotonic()

    def numbers(self, room: int) -> list[int]:
        prefix = f"soak {self.tag} {room} "
        return [int(e["content"]["body"][len(prefix):]) for e in self.hs.messages(self.reader, self.rooms[room])
                if str(e["content"].get("body", "")).startswith(prefix)]

    def wait_posted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(self.numbers(i)) >= self.published.get(i, 0) for i in range(self.ROOMS)):
                # doubles may still be on their way: a moment more
                time.sleep(2)
                return
            time.sleep(1)

    def check(self) -> BotsFigures:
        f = BotsFigures()
        for room in range(self.ROOMS):
            expected = self.published.get(room, 0)
            got = self.numbers(room)
            seen: dict[int, int] = {}
            for n in got:
                seen[n] = seen.get(n, 0) + 1
            f.expected += expected
            f.once += sum(1 for n in range(1, expected + 1) if seen.get(n) == 1)
            missing = [n for n in range(1, expected + 1) if n not in seen]
            doubled = sum(k - 1 for n, k in seen.items() if k > 1 and (room, n) not in self.uncertain)
            disordered = sum(1 for a, c in pairwise(got) if c < a)
            f.missing += len(missing)
            f.doubled += doubled
            f.disordered += disordered
            if missing or doubled or disordered:
                when = ", ".join(f"#{n} published +{self.times[(room, n)] - self.t0:.1f}s" for n in missing[:10]
                                 if (room, n) in self.times)
                f.problems.append(f"bots room {room}: {len(got)} posted of {expected}, {len(missing)} missing"
                                  f"{f' ({when})' if when else ''}, {doubled} doubled, {disordered} out of order")
        return f
