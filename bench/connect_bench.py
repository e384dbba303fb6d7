"""Connects scenario: N websocket clients connect (handshake, OPEN, CONNECT
with a channel token, the CONNECT reply), 50 at a time, to a fresh server;
the wall time and the server's CPU over the burst, in rounds that take
turns, the median of each counted.
"""

from __future__ import annotations

import asyncio
import statistics

from channels_common.redis import create_redis

from bench.processes import NodeDriver, Server, end_run
from bench.procstat import cpu_seconds
from bench.records_bench import RecordsConfig, write_tokens


async def run_connects(server: Server, cfg: RecordsConfig, redis_url: str, log, profiler=None) -> dict:
    redis = create_redis(redis_url, max_connections=4)
    driver = None
    result: dict = {"server": server.name, "clients": cfg.clients}
    try:
        await redis.flushdb()
        await write_tokens(redis, cfg)
        server.start()
        await asyncio.sleep(cfg.settle_seconds / 2)
        driver = NodeDriver("records.mjs")
        if profiler is not None:
            profiler.start(server.pid)
        before = cpu_seconds(server.pid)
        connect = await asyncio.to_thread(
            driver.call,
            {"cmd": "connect", "url": f"ws://127.0.0.1:{server.port}/socket.io/", "clients": cfg.clients,
             "groups": cfg.groups, "tokenPrefix": cfg.token_prefix, "client": cfg.client},
            "connected",
            300.0,
        )
        cpu = cpu_seconds(server.pid) - before
        result.update(seconds=connect["ms"] / 1000, failed=connect["failed"], cpu_s=cpu,
                      cpu_ms_per_connect=cpu * 1000 / max(1, connect["count"]))
        log(f"  {server.name}: {connect['count']} connects in {result['seconds']:.2f} s, "
            f"{result['cpu_ms_per_connect']:.3f} ms server CPU each"
            + (f", {connect['failed']} failed {connect['reasons']}" if connect["failed"] else ""))
    except Exception as exc:  # noqa: BLE001 - a broken server is a result, not a crash of the bench
        result["error"] = str(exc)
        log(f"  {server.name}: FAILED: {exc}")
    finally:
        end_run(server, driver, profiler, result)
        await redis.aclose()
    return result


def median_run(runs: list[dict]) -> dict:
    """The medians over the rounds (all rounds stay in the JSON)."""
    good = [r for r in runs if "error" not in r and not r.get("failed")]
    if not good:
        return {**runs[-1], "rounds": runs}
    return {
        "server": good[0]["server"],
        "clients": good[0]["clients"],
        "seconds": statistics.median(r["seconds"] for r in good),
        "cpu_ms_per_connect": statistics.median(r["cpu_ms_per_connect"] for r in good),
        "rounds": runs,
    }


def table(results: dict) -> str:
    ours, ref = results.get("ours") or {}, results.get("reference") or {}
    lines = [(f"connects: {ours.get('clients') or ref.get('clients')} websockets, median of "
              f"{len(ours.get('rounds') or ref.get('rounds') or [])} rounds"),
             f"  {'':24} {'ours':>10} {'Node':>10}"]
    for key, label, fmt in (("seconds", "wall time (s)", "{:.2f}"),
                            ("cpu_ms_per_connect", "server CPU per connect (ms)", "{:.3f}")):
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for r in (ours, ref)]
        lines.append(f"  {label:24} {cells[0]:>10} {cells[1]:>10}")
    for who, res in (("ours", ours), ("Node", ref)):
        rounds = ", ".join(f"{r['seconds']:.2f} s/{r['cpu_ms_per_connect']:.3f} ms"
                           for r in res.get("rounds") or [] if "seconds" in r)
        lines.append(f"  {who} rounds: {rounds}")
    return "\n".join(lines)
