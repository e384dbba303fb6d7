"""records under the soak: socket.io-client v4 browsers (websocket,
long-polling, and polling upgraded to websocket) in overlapping group rooms,
a publisher numbering every /records message per room and every
/system_notice, and the delivery invariant: each client gets every message
of its rooms exactly once, in order, across drops and time away."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise

import redis as redis_sync
from channels_common.publish import NOTICE_CHANNEL, RECORDS_CHANNEL

from tests.integration.records_support import APP_ORIGIN
from tests.support import NodeScript

GROUPS = 6
TRANSPORTS = (["websocket"], ["polling"], ["polling", "websocket"])


@dataclass
class Browser:
    name: str
    token: str
    user_id: int
    groups: tuple[int, ...]
    transports: list[str]
    address: str
    got: dict[str, list[int]] = field(default_factory=dict)
    # (monotonic time, "connect"/"disconnect", recovered or reason)
    timeline: list[tuple[float, str, object]] = field(default_factory=list)

    @property
    def rooms(self) -> list[str]:
        return [f"group-{g}" for g in self.groups] + [f"user-{self.user_id}", "notice"]


def browsers(count: int) -> list[Browser]:
    out = []
    for i in range(count):
        groups = tuple(sorted({1 + i % GROUPS, 1 + (i * 5 + 2) % GROUPS}))
        out.append(Browser(f"b{i}", f"soak-token-{i}", 100 + i, groups, TRANSPORTS[i % 3], f"127.0.1.{i + 1}"))
    return out


@dataclass
class RecordsFigures:
    expected: int = 0
    once: int = 0
    missing: int = 0
    doubled: int = 0
    disordered: int = 0
    reconnects: int = 0
    recovered: int = 0
    not_recovered: int = 0
    not_recovered_allowed: int = 0
    foreign: int = 0
    problems: list[str] = field(default_factory=list)


class RecordsLoad:
    def __init__(self, redis_url: str, proxy_port: int, count: int, rate: float, seed: int, cap: int):
        self.redis_url = redis_url
        self.url = f"http://127.0.0.1:{proxy_port}"
        self.clients = browsers(count)
        self.by_name = {b.name: b for b in self.clients}
        self.rate = rate
        self.rng = random.Random(seed ^ 0x5EC0)
        self.cap = cap
        self.published: dict[str, list[float]] = {}  # room -> publish time of message n (index n-1)
        self.foreign = 0
        self.uncertain: set[tuple[str, int]] = set()
        self.t0 = time.monotonic()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.stderr: list[str] = []

    def write_tokens(self, r: redis_sync.Redis) -> None:
        for b in self.clients:
            r.set(f"/current_users/{b.token}",
                  json.dumps({"id": b.user_id, "name": f"Soak {b.name}", "group_ids": list(b.groups)}))

    def start_clients(self) -> None:
        specs = [{"name": b.name, "token": b.token, "transports": b.transports, "address": b.address}
                 for b in self.clients]
        self.node = NodeScript("soak-records.mjs", json.dumps({"url": self.url, "origin": APP_ORIGIN, "clients": specs}))
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.lock:
                if all(any(k == "connect" for _, k, _ in b.timeline) for b in self.clients):
                    return
            time.sleep(0.1)
        raise RuntimeError("records clients did not all connect")

    def _read(self) -> None:
        for line in self.node.lines():
            now = time.monotonic()
            kind = line.get("t")
            with self.lock:
                b = self.by_name.get(line.get("c"))
                if kind == "rec" and b:
                    b.got.setdefault(line["room"], []).append(line["n"])
                elif kind == "notice" and b:
                    b.got.setdefault("notice", []).append(line["n"])
                elif kind == "connect" and b:
                    b.timeline.append((now, "connect", line["recovered"]))
                elif kind == "disconnect" and b:
                    b.timeline.append((now, "disconnect", line["reason"]))
                elif kind == "other":
                    self.foreign += 1
                elif kind in ("back", "connect_error", "away-skipped") and b:
                    b.timeline.append((now, kind, line.get("message")))

    def _read_err(self) -> None:
        for line in self.node.process.stderr:
            self.stderr.append(line)

    def away(self, name: str, seconds: float) -> None:
        self.node.send({"cmd": "away", "c": name, "ms": int(seconds * 1000)})

    # -- publisher ---------------------------------------------------------------

    def rooms(self) -> list[str]:
        return [f"group-{g}" for g in range(1, GROUPS + 1)] + [f"user-{b.user_id}" for b in self.clients]

    def publish_loop(self) -> None:
        """Numbered messages at `rate` per second until stopped. A PUBLISH
        that fails (Redis down) or reaches no records instance is sent
        again: what was published is what at least one instance took."""
        r = redis_sync.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        rooms = self.rooms()
        while not self.stop_event.is_set():
            room = "notice" if self.rng.random() < 0.1 else self.rng.choice(rooms)
            self.publish_one(r, room)
            time.sleep(self.rng.expovariate(self.rate))
        r.close()

    def publish_one(self, r: redis_sync.Redis, room: str) -> None:
        n = len(self.published.get(room, [])) + 1
        if room == "notice":
            channel, data = NOTICE_CHANNEL, json.dumps({"soak_notice": n})
        else:
            channel, data = RECORDS_CHANNEL, json.dumps({"room": room, "records": {"soak": n}})
        while True:
            try:
                if r.publish(channel, data) > 0:
                    break
            except redis_sync.RedisError:
                # Redis may have taken it before it died: a double of n is not the service's.
                self.uncertain.add((room, n))
            time.sleep(0.1)
        self.published.setdefault(room, []).append(time.monotonic())

    def flush(self) -> None:
        """One last message in every room, so a client's last drop shows as a gap."""
        r = redis_sync.Redis.from_url(self.redis_url)
        for room in [*self.rooms(), "notice"]:
            self.publish_one(r, room)
        r.close()

    def wait_delivered(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                # The last message of a room is the flush: once each client
                # has it, nothing else is on its way (gaps stay gaps).
                behind = [f"{b.name} {room} at {b.got.get(room, [0])[-1]} of {len(self.published.get(room, []))}"
                          for b in self.clients for room in b.rooms
                          if b.got.get(room, [0])[-1] < len(self.published.get(room, []))]
            if not behind:
                return []
            if time.monotonic() > deadline:
                return behind
            time.sleep(0.2)

    # -- invariant ---------------------------------------------------------------

    def check(self) -> RecordsFigures:
        f = RecordsFigures(foreign=self.foreign)
        with self.lock:
            for b in self.clients:
                for room in b.rooms:
                    expected = len(self.published.get(room, []))
                    got = b.got.get(room, [])
                    f.expected += expected
                    seen: dict[int, int] = {}
                    for n in got:
                        seen[n] = seen.get(n, 0) + 1
                    once = sum(1 for n in range(1, expected + 1) if seen.get(n) == 1)
                    f.once += once
                    missing = [n for n in range(1, expected + 1) if n not in seen]
                    doubled = [n for n, k in seen.items() if k > 1 and (room, n) not in self.uncertain]
                    f.missing += len(missing)
                    f.doubled += sum(seen[n] - 1 for n in doubled)
                    disordered = sum(1 for a, c in pairwise(got) if c <= a)
                    f.disordered += disordered
                    if missing or doubled or disordered:
                        f.problems.append(
                            f"{b.name} ({'+'.join(b.transports)}) {room}: {len(got)} got of {expected}, "
                            f"missing {_ranges(missing)}, doubled {_ranges(sorted(doubled))}, "
                            f"{disordered} out of order; {self._around(b, room, missing or sorted(doubled))}")
                self._check_reconnects(b, f)
        return f

    def _around(self, b: Browser, room: str, numbers: list[int]) -> str:
        """When the first wrong messages were published, and what the client
        went through around then (times from the start of the load)."""
        times = self.published.get(room, [])
        shown = []
        for n in numbers[:3]:
            at = times[n - 1]
            near = [f"{k}{'' if v is None else f'({v})'} +{t - self.t0:.1f}"
                    for t, k, v in b.timeline if abs(t - at) < 4.0]
            shown.append(f"#{n} published +{at - self.t0:.1f}s [{', '.join(near) or 'no reconnect nearby'}]")
        return "; ".join(shown)

    def _check_reconnects(self, b: Browser, f: RecordsFigures) -> None:
        connects = [(t, rec) for t, k, rec in b.timeline if k == "connect"]
        for index, (t, recovered) in enumerate(connects[1:], start=1):
            f.reconnects += 1
            if recovered:
                f.recovered += 1
                continue
            f.not_recovered += 1
            # Allowed only when more than the cap was published to one of its
            # rooms while it was away (the log no longer holds the gap).
            left = max((tt for tt, k, _ in b.timeline if k == "disconnect" and tt <= t), default=connects[index - 1][0])
            over = [room for room in b.rooms
                    if sum(1 for pt in self.published.get(room, []) if left <= pt <= t) > self.cap]
            if over:
                f.not_recovered_allowed += 1
            else:
                f.problems.append(f"{b.name} ({'+'.join(b.transports)}) reconnected with recovered: false "
                                  f"at +{t - self.t0:.1f}s, the cap not exceeded")

    def dump(self) -> dict:
        """Every client's timeline and what it got, for a failure's post-mortem."""
        with self.lock:
            return {b.name: {"transports": b.transports, "rooms": b.rooms,
                             "timeline": [(round(t - self.t0, 2), k, v) for t, k, v in b.timeline],
                             "got": b.got} for b in self.clients} | {
                "_published": {room: [round(t - self.t0, 2) for t in times] for room, times in self.published.items()}}

    def close(self) -> None:
        try:
            self.node.send({"cmd": "quit"})
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.node.close()


def _ranges(numbers: list[int]) -> str:
    if not numbers:
        return "none"
    parts, start, prev = [], numbers[0], numbers[0]
    for n in numbers[1:]:
        if n != prev + 1:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = n
        prev = n
    parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    shown = ",".join(parts[:8])
    return shown + (f",... ({len(numbers)} in all)" if len(parts) > 8 else "")
