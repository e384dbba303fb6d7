"""The seeded fault schedule: pure, so that a seed replays the same faults.

A fault is (at, kind, target, seconds): `kill` (SIGKILL) and `term`
(SIGTERM) of one instance, restarted after `seconds`; `redis` (SIGKILL of
Redis, restarted from its AOF after `seconds`); `cut` (a share of one
proxy's connections aborted); `stall` (one proxy reads nothing for
`seconds`); `away` (one records client gone for `seconds`, within the
recovery window: `/net` its network gone, no goodbye; `/close` its transport
closed by the client itself); `ghost` (a collab client killed, its awareness must go)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    target: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        target = f" {self.target}" if self.target else ""
        pause = f" {self.seconds:.1f}s" if self.seconds else ""
        return f"t={self.at:6.1f} {self.kind}{target}{pause}"


# Relative weights of the kinds drawn at each step.
WEIGHTS = {"kill": 5, "term": 3, "cut": 4, "stall": 2, "away": 3}


def make_schedule(seed: int, seconds: float, instances: dict[str, int], records_clients: list[str],
                  mean_gap: float = 2.5, redis_every: float = 60.0) -> list[Fault]:
    """Faults from t=3 s to `seconds` - 5 s. `instances` is {service: count};
    a service with one instance is never killed (the soak checks what
    survives the death of one instance, not of the service). The ghost
    dies early, so that its awareness timeout passes before the end."""
    rng = random.Random(seed)
    end = seconds - 5.0
    faults: list[Fault] = [Fault(round(min(8.0, end / 4), 1), "ghost", "collab")]
    killable = [f"{svc}{i}" for svc, n in sorted(instances.items()) if n > 1 for i in range(n)]
    kinds = [k for k in WEIGHTS if k not in ("kill", "term") or killable]
    weights = [WEIGHTS[k] for k in kinds]
    t = 3.0
    while True:
        t += rng.expovariate(1.0 / mean_gap)
        if t >= end:
            break
        kind = rng.choices(kinds, weights)[0]
        if kind in ("kill", "term"):
            faults.append(Fault(round(t, 1), kind, rng.choice(killable), round(rng.uniform(0.3, 3.0), 1)))
        elif kind in ("cut", "stall"):
            proxy = rng.choice(["records", "collab"])
            pause = round(rng.uniform(0.5, 4.0), 1) if kind == "stall" else round(rng.uniform(0.1, 1.0), 2)
            faults.append(Fault(round(t, 1), kind, proxy, pause))
        else:
            # Gone either with its network (no goodbye) or by closing its transport itself.
            how = rng.choice(["net", "close"])
            faults.append(Fault(round(t, 1), kind, f"{rng.choice(records_clients)}/{how}",
                                round(rng.uniform(1.0, 8.0), 1)))
    # Redis: once in every `redis_every` seconds, at least once.
    count = max(1, int(seconds // redis_every))
    for k in range(count):
        lo, hi = 5.0 + k * (end - 5.0) / count, 5.0 + (k + 1) * (end - 5.0) / count
        faults.append(Fault(round(rng.uniform(lo, max(lo, hi - 3.0)), 1), "redis", "", round(rng.uniform(0.5, 2.0), 1)))
    return sorted(faults, key=lambda f: (f.at, f.kind, f.target))


def summary(faults: list[Fault]) -> str:
    """`212 faults (84 kills, 9 Redis restarts, ...)`."""
    names = {"kill": "SIGKILLs", "term": "SIGTERMs", "redis": "Redis restarts", "cut": "cuts",
             "stall": "stalls", "away": "clients away", "ghost": "dead editors"}
    counts = {k: sum(1 for f in faults if f.kind == k) for k in names}
    parts = ", ".join(f"{n} {names[k]}" for k, n in counts.items() if n)
    return f"{len(faults)} faults ({parts})"
