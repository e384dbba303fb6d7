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
        server.start()
        await asyncio.sleep(cfg.settle_seconds / 2)
        baseline = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
        driver = NodeDriver("collab.mjs")
        if profiler is not None:
            profiler.start(server.pid)
        url = f"ws://127.0.0.1:{server.port}"
        loaded = await asyncio.to_thread(driver.call, {"cmd": "load", "url": url, "docs": cfg.docs}, "loaded", 300.0)
        result["load"] = loaded
        log(f"  {server.name}: {loaded['docs']} documents loaded in {loaded['ms'] / 1000:.1f} s"
            + (f", {loaded['failed']} failed" if loaded["failed"] else ""))
        await asyncio.sleep(cfg.settle_seconds)
        loaded_rss = settled_rss(server.pid, interval=cfg.settle_seconds / 10)
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
