"""Records scenario: N websocket clients in G groups, a publisher stepping up
the /records rate, and what each step costs the server.

The publisher lives here (the run.py process); the clients live in the Node
load generator; the server is its own process. Latency is measured end to
end: the publisher stamps its wall-clock send time in the payload, the client
subtracts it on arrival.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

from channels_common.auth import current_user_key
from channels_common.publish import RECORDS_CHANNEL
from channels_common.redis import create_redis

from bench.processes import NodeDriver, Server, end_run
from bench.procstat import OtherLoad, cpu_seconds, settled_rss

P99_LIMIT_MS = 100.0


POLLING_RATES = [500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000]


@dataclass
class RecordsConfig:
    clients: int = 2000
    groups: int = 20
    # Target deliveries per second, one step each. The top steps are past
    # what the load generator itself keeps up with on 2 cores (~80,000/s).
    rates: list[int] = field(
        default_factory=lambda: [
            2500, 5000, 10000, 15000, 20000, 25000, 30000, 35000, 40000, 45000, 50000, 55000, 60000, 70000,
            80000, 90000, 100000,
        ]
    )
    step_seconds: float = 4.0
    payload_bytes: int = 1024
    drain_seconds: float = 3.0
    # A step this bad means the server is saturated; higher steps only queue more.
    stop_p99_ms: float = 1000.0
    stop_loss: float = 0.02
    token_prefix: str = "bench-token-"
    # Client of the load generator: "raw" (bench/loadgen/rawws.mjs) or "ws" (the npm package)
    # websockets, or "polling" (Engine.IO long-polling over HTTP/1.1 keep-alive).
    client: str = "raw"
    # Quiet time before memory is read, so startup and connection bursts settle.
    settle_seconds: float = 2.0


def group_sizes(clients: int, groups: int) -> list[int]:
    """Client i belongs to group i % groups (as the load generator assigns)."""
    return [clients // groups + (1 if g < clients % groups else 0) for g in range(groups)]


def payload(step: int, seq: int, group: int, size: int) -> str:
    """A /records message of about `size` bytes carrying its send time."""
    records = {
        "bench": [step, seq, round(time.time() * 1000, 3), group],
        "discussions": [{"id": seq, "key": f"d{seq}", "title": "Benchmark discussion", "description": ""}],
    }
    message = {"room": f"group-{group + 1}", "records": records}
    body = json.dumps(message, separators=(",", ":"))
    records["discussions"][0]["description"] = "x" * max(0, size - len(body))
    return json.dumps(message, separators=(",", ":"))


def headline(steps: list[dict]) -> dict | None:
    """The highest delivery rate with p99 under the limit and nothing lost."""
    good = [
        s
        for s in steps
        if s["received"] > 0 and s["lost"] == 0 and s["misrouted"] == 0 and s["p99_ms"] < P99_LIMIT_MS
    ]
    return max(good, key=lambda s: s["deliveries_per_s"], default=None)


async def write_tokens(redis, cfg: RecordsConfig) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(cfg.clients):
            user = {"id": i + 1, "name": f"Bench {i + 1}", "group_ids": [i % cfg.groups + 1]}
            pipe.set(current_user_key(f"{cfg.token_prefix}{i}"), json.dumps(user))
        await pipe.execute()


async def publish_step(redis, cfg: RecordsConfig, step: int, messages_per_s: float) -> tuple[int, int, float]:
    """Publish at a steady rate for one step; return (published, expected deliveries, start time)."""
    sizes = group_sizes(cfg.clients, cfg.groups)
    start = time.time()
    total = int(messages_per_s * cfg.step_seconds)
    sent = expected = 0
    while sent < total:
        due = min(total, int((time.time() - start) * messages_per_s) + 1)
        if due > sent:
            async with redis.pipeline(transaction=False) as pipe:
                for seq in range(sent, due):
                    group = seq % cfg.groups
                    pipe.publish(RECORDS_CHANNEL, payload(step, seq, group, cfg.payload_bytes))
                    expected += sizes[group]
                await pipe.execute()
            sent = due
        await asyncio.sleep(0.002)
    return sent, expected, start


async def warm_up(redis, driver: NodeDriver, cfg: RecordsConfig, connected: int, timeout: float = 60.0) -> bool:
    """Publish to every group until every client has heard one: rooms are
    joined asynchronously after the CONNECT reply, on both servers."""
    deadline = time.monotonic() + timeout
    seq = 0
    while time.monotonic() < deadline:
        for group in range(cfg.groups):
            await redis.publish(RECORDS_CHANNEL, payload(-1, seq, group, 200))
            seq += 1
        await asyncio.sleep(0.3)
        status = await asyncio.to_thread(driver.call, {"cmd": "status"}, "status")
        if status["heard"] >= connected:
            await asyncio.to_thread(driver.call, {"cmd": "stats", "step": -1}, "stats")
            return True
    return False


async def drain(driver: NodeDriver, step: int, expected: int, seconds: float) -> None:
    """Wait until the step's deliveries stop arriving (or all have)."""
    deadline = time.monotonic() + seconds
    last = -1
    while time.monotonic() < deadline:
        peek = await asyncio.to_thread(driver.call, {"cmd": "peek", "step": step}, "peek")
        if peek["received"] >= expected:
            return
        if peek["received"] == last and time.monotonic() > deadline - seconds / 2:
            return
        last = peek["received"]
        await asyncio.sleep(0.25)


async def run_records(
    server: Server, cfg: RecordsConfig, redis_url: str, log, profiler=None, helper_pids: tuple[int, ...] = ()
) -> dict:
    redis = create_redis(redis_url, max_connections=4)
    driver = None
    result: dict = {"server": server.name, "config": cfg.__dict__.copy(), "steps": []}
    try:
        await redis.flushdb()
        await write_tokens(redis, cfg)
        server.start()
        await asyncio.sleep(cfg.settle_seconds / 2)
        baseline = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        driver = NodeDriver("records.mjs")
        connect = await asyncio.to_thread(
            driver.call,
            {
                "cmd": "connect",
                "url": f"{'http' if cfg.client == 'polling' else 'ws'}://127.0.0.1:{server.port}/socket.io/",
                "clients": cfg.clients,
                "groups": cfg.groups,
                "tokenPrefix": cfg.token_prefix,
                "client": cfg.client,
            },
            "connected",
            300.0,
        )
        result["connect"] = connect
        log(f"  {server.name}: {connect['count']} clients connected in {connect['ms'] / 1000:.1f} s"
            + (f", {connect['failed']} failed {connect['reasons']}" if connect["failed"] else ""))
        if not await warm_up(redis, driver, cfg, connect["count"]):
            raise RuntimeError("not every client received a warm-up message within 60 s")
        await asyncio.sleep(cfg.settle_seconds)
        connected_rss = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        result["memory"] = {
            "baseline_rss": baseline,
            "connected_rss": connected_rss,
            "per_client_bytes": (connected_rss - baseline) / max(1, connect["count"]),
        }
        log(f"  {server.name}: {result['memory']['per_client_bytes'] / 1024:.1f} KiB per idle connection")
        clients_per_message = cfg.clients / cfg.groups
        if profiler is not None:
            profiler.start(server.pid)
        for step, rate in enumerate(cfg.rates):
            cpu_before = cpu_seconds(server.pid)
            client_cpu_before, wall_before = cpu_seconds(driver.pid), time.monotonic()
            others = OtherLoad([server.pid, driver.pid, os.getpid(), *helper_pids])
            published, expected, start = await publish_step(redis, cfg, step, rate / clients_per_message)
            await drain(driver, step, expected, cfg.drain_seconds)
            cpu = cpu_seconds(server.pid) - cpu_before
            # Near 100 % the clients, not the server, limit what this step measures.
            client_busy = (cpu_seconds(driver.pid) - client_cpu_before) / (time.monotonic() - wall_before)
            other_cores = others.cores()
            stats = await asyncio.to_thread(driver.call, {"cmd": "stats", "step": step}, "stats")
            received = stats["received"]
            elapsed = ((stats["last"] or start * 1000) / 1000 - start) if received else cfg.step_seconds
            row = {
                "step": step,
                "target_per_s": rate,
                "published": published,
                "expected": expected,
                "received": received,
                "lost": max(0, expected - received),
                "loss": max(0, expected - received) / expected if expected else 0.0,
                "misrouted": stats["misrouted"],
                "deliveries_per_s": received / max(elapsed, cfg.step_seconds),
                "p50_ms": stats["p50"],
                "p99_ms": stats["p99"],
                "max_ms": stats["max"],
                "cpu_s": cpu,
                "cpu_us_per_delivery": cpu / received * 1e6 if received else None,
                "rss": settled_rss(server.pid, samples=1, interval=0),
                "open_clients": stats["open"],
                "loadgen_cpu_share": client_busy,
                "other_processes_cores": other_cores,
            }
            result["steps"].append(row)
            log(
                f"  {server.name} step {step}: {row['deliveries_per_s']:8.0f}/s  loss {row['loss']:.2%}  "
                f"p50 {fmt_ms(row['p50_ms'])}  p99 {fmt_ms(row['p99_ms'])}  max {fmt_ms(row['max_ms'])}  "
                f"cpu {fmt_us(row['cpu_us_per_delivery'])}/delivery  (load generator {client_busy:.0%} busy, "
                f"others {other_cores:.1f} cores)"
            )
            if not server.alive():
                result["error"] = "server exited during the run"
                break
            if row["p99_ms"] is None or row["p99_ms"] > cfg.stop_p99_ms or row["loss"] > cfg.stop_loss:
                break
    except Exception as exc:  # noqa: BLE001 - a broken server is a result, not a crash of the bench
        result["error"] = str(exc)
        log(f"  {server.name}: FAILED: {exc}")
    finally:
        end_run(server, driver, profiler, result)
        await redis.aclose()
    best = headline(result["steps"])
    result["headline"] = best
    return result


def fmt_ms(value: float | None) -> str:
    return "   -   " if value is None else f"{value:6.1f}ms"


def fmt_us(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.1f}µs"
