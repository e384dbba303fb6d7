"""Collab scenario: D documents, an editor and an observer on each; update
propagation, server CPU per update, memory per loaded document, and the time
a new client takes to sync a 100 KB document."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from bench.processes import NodeDriver, Server, end_run
from bench.procstat import OtherLoad, cpu_seconds, settled_rss


@dataclass
class CollabConfig:
    docs: int = 500
    # Updates per second from each editor.
    edit_rate: float = 1.0
    edit_seconds: float = 10.0
    big_bytes: int = 100_000
    big_repeats: int = 3
    # Quiet time before memory is read, so startup and connection bursts settle.
    settle_seconds: float = 2.0


async def run_collab(
    server: Server, cfg: CollabConfig, log, helper_pids: tuple[int, ...] = (), profiler=None
) -> dict:
    driver = None
    result: dict = {"server": server.name, "config": cfg.__dict__.copy()}
    try:
        # Every round from an empty Redis, as the reference starts from empty
        # memory: else ours would load the drafts of the round before (the
        # same document names), heavier documents than the reference's.
        if server.env.get("REDIS_URL"):
            import redis as redis_sync

            with redis_sync.Redis.from_url(server.env["REDIS_URL"]) as client:
                client.flushall()
        server.start()
        await asyncio.sleep(cfg.settle_seconds / 2)
        baseline = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        driver = NodeDriver("collab.mjs")
        url = f"ws://127.0.0.1:{server.port}"
        loaded = await asyncio.to_thread(driver.call, {"cmd": "load", "url": url, "docs": cfg.docs}, "loaded", 300.0)
        result["load"] = loaded
        log(f"  {server.name}: {loaded['docs']} documents loaded in {loaded['ms'] / 1000:.1f} s"
            + (f", {loaded['failed']} failed" if loaded["failed"] else ""))
        await asyncio.sleep(cfg.settle_seconds)
        loaded_rss = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        if profiler is not None:
            # The edit phase only: what CPU per update measures.
            profiler.start(server.pid)
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        others = OtherLoad([server.pid, driver.pid, os.getpid(), *helper_pids])
        edited = await asyncio.to_thread(
            driver.call,
            {"cmd": "edit", "rate": cfg.edit_rate, "seconds": cfg.edit_seconds, "drainMs": 3000},
            "edited",
            cfg.edit_seconds + 120,
        )
        cpu = cpu_seconds(server.pid) - cpu_before
        if profiler is not None:
            profiler.stop()
        wall = time.monotonic() - started
        await asyncio.sleep(cfg.settle_seconds / 2)
        edited_rss = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        docs = max(1, loaded["docs"])
        result["edit"] = {
            **edited,
            "updates_per_s": edited["sent"] / cfg.edit_seconds,
            "lost": max(0, edited["sent"] - edited["received"]),
            "cpu_s": cpu,
            "wall_s": wall,
            "cpu_us_per_update": cpu / edited["sent"] * 1e6 if edited["sent"] else None,
            "other_processes_cores": others.cores(),
        }
        result["memory"] = {
            "baseline_rss": baseline,
            "loaded_rss": loaded_rss,
            "edited_rss": edited_rss,
            "per_doc_loaded_bytes": (loaded_rss - baseline) / docs,
            "per_doc_edited_bytes": (edited_rss - baseline) / docs,
        }
        log(
            f"  {server.name}: {edited['sent']} updates, p50 {edited['p50'] or 0:.1f} ms, "
            f"p99 {edited['p99'] or 0:.1f} ms, {result['edit']['cpu_us_per_update'] or 0:.0f} µs CPU/update, "
            f"{result['memory']['per_doc_loaded_bytes'] / 1024:.1f} KiB/doc loaded, "
            f"load generator GC {(edited.get('gc') or {}).get('totalMs', 0):.0f} ms"
        )
        big = await asyncio.to_thread(
            driver.call,
            {"cmd": "bigsync", "bytes": cfg.big_bytes, "repeats": cfg.big_repeats},
            "bigsync",
            300.0,
        )
        result["bigsync"] = big
        log(f"  {server.name}: new client syncs {cfg.big_bytes // 1000} KB in {big['median'] or 0:.1f} ms (median)")
    except Exception as exc:  # noqa: BLE001 - a broken server is a result, not a crash of the bench
        result["error"] = str(exc)
        log(f"  {server.name}: FAILED: {exc}")
    finally:
        end_run(server, driver, profiler, result)
    return result


async def run_collab_cluster(
    servers: list[Server], cfg: CollabConfig, log, redis_url: str, redis_pid: int, helper_pids: tuple[int, ...] = ()
) -> dict:
    """Two instances on one Redis: each document's editor on the first, its
    observer on the second. Propagation across instances, CPU per update
    summed over both, Redis CPU per update, Redis memory per document."""
    import redis as redis_sync

    driver = None
    name = servers[0].name
    result: dict = {"server": name, "instances": len(servers), "config": cfg.__dict__.copy()}
    client = redis_sync.Redis.from_url(redis_url)
    try:
        client.flushall()
        memory_before = client.info("memory")["used_memory"]
        for server in servers:
            server.start()
        driver = NodeDriver("collab.mjs")
        first, second = (f"ws://127.0.0.1:{s.port}" for s in servers[:2])
        loaded = await asyncio.to_thread(
            driver.call, {"cmd": "load", "url": first, "observerUrl": second, "docs": cfg.docs}, "loaded", 300.0
        )
        result["load"] = loaded
        log(f"  {name} x{len(servers)}: {loaded['docs']} documents loaded in {loaded['ms'] / 1000:.1f} s"
            + (f", {loaded['failed']} failed" if loaded["failed"] else ""))
        await asyncio.sleep(cfg.settle_seconds)
        pids = [s.pid for s in servers]
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        redis_before = cpu_seconds(redis_pid)
        others = OtherLoad([*pids, redis_pid, driver.pid, os.getpid(), *helper_pids])
        edited = await asyncio.to_thread(
            driver.call,
            {"cmd": "edit", "rate": cfg.edit_rate, "seconds": cfg.edit_seconds, "drainMs": 3000},
            "edited",
            cfg.edit_seconds + 120,
        )
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        redis_cpu = cpu_seconds(redis_pid) - redis_before
        await asyncio.sleep(cfg.settle_seconds / 2)
        docs = max(1, loaded["docs"])
        sent = edited["sent"]
        result["edit"] = {
            **edited,
            "lost": max(0, sent - edited["received"]),
            "cpu_s": cpu,
            "cpu_us_per_update": cpu / sent * 1e6 if sent else None,
            "redis_cpu_s": redis_cpu,
            "redis_cpu_us_per_update": redis_cpu / sent * 1e6 if sent else None,
            "other_processes_cores": others.cores(),
        }
        result["redis"] = {
            "used_memory_before": memory_before,
            "used_memory_after": client.info("memory")["used_memory"],
        }
        result["redis"]["per_doc_bytes"] = (result["redis"]["used_memory_after"] - memory_before) / docs
        log(
            f"  {name} x{len(servers)}: {sent} updates, p50 {edited['p50'] or 0:.1f} ms, "
            f"p99 {edited['p99'] or 0:.1f} ms across instances, "
            f"{result['edit']['cpu_us_per_update'] or 0:.0f} µs CPU/update (instances), "
            f"{result['edit']['redis_cpu_us_per_update'] or 0:.0f} µs Redis CPU/update, "
            f"{result['redis']['per_doc_bytes'] / 1024:.1f} KiB Redis/doc"
        )
    except Exception as exc:  # noqa: BLE001 - a broken server is a result, not a crash of the bench
        result["error"] = str(exc)
        log(f"  {name}: FAILED: {exc}")
    finally:
        for server in servers[1:]:
            alive = server.alive()
            server.stop()
            if not alive and "error" not in result:
                result["error"] = "an instance exited during the run"
        end_run(servers[0], driver, None, result)
        client.close()
    return result
