"""Where our records server's memory per connection goes.

Runs channels-records under tracemalloc, connects N idle clients with the
records load generator, and compares heap snapshots taken before and after:
the top allocation sites per connection, next to the RSS growth per
connection (the difference is memory Python's allocator does not see:
uvloop/libuv, OpenSSL, the C parts of extensions, allocator slack).

    python bench/memprofile.py [--clients 2000] [--groups 20] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

from channels_common.redis import create_redis
from channels_dev.redis_server import start_local_redis

from bench.processes import NodeDriver, Server, free_port
from bench.procstat import settled_rss
from bench.records_bench import RecordsConfig, warm_up, write_tokens


def trace_snapshots() -> Path:
    """Start tracemalloc in this (server) process and dump a heap snapshot to
    MEMTRACE_DIR on each SIGUSR1 (after a collection with MEMTRACE_GC set)."""
    out = Path(os.environ["MEMTRACE_DIR"])
    tracemalloc.start(int(os.environ.get("MEMTRACE_FRAMES", "8")))
    taken = [0]

    def snapshot(_signum, _frame):
        if os.environ.get("MEMTRACE_GC"):
            import gc

            gc.collect()
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{taken[0]}.pickle"))
        taken[0] += 1

    signal.signal(signal.SIGUSR1, snapshot)
    return out


def serve_traced() -> None:
    """The server side: channels-records with a SIGUSR1 heap snapshot."""
    trace_snapshots()
    from channels_records.app import main

    sys.exit(main())


def wait_snapshot(directory: Path, index: int, timeout: float = 60.0) -> tracemalloc.Snapshot:
    path = directory / f"snapshot-{index}.pickle"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            size = path.stat().st_size
            time.sleep(0.5)
            if path.stat().st_size == size:
                return tracemalloc.Snapshot.load(str(path))
        time.sleep(0.2)
    raise RuntimeError("the server wrote no heap snapshot")


async def measure(args) -> None:
    cfg = RecordsConfig(clients=args.clients, groups=args.groups)
    snapshots = Path(tempfile.mkdtemp(prefix="memtrace-"))
    redis_server = start_local_redis()
    redis = create_redis(redis_server.url, max_connections=4)
    server = Server(
        "ours-traced",
        [sys.executable, str(Path(__file__).resolve()), "--serve"],
        free_port(),
        {"REDIS_URL": redis_server.url, "LOG_LEVEL": "WARNING", "MEMTRACE_DIR": str(snapshots)},
    )
    driver = None
    try:
        await write_tokens(redis, cfg)
        server.start()
        await asyncio.sleep(1.0)
        rss_before = settled_rss(server.pid)
        server.process.send_signal(signal.SIGUSR1)
        before = wait_snapshot(snapshots, 0)
        driver = NodeDriver("records.mjs")
        connect = await asyncio.to_thread(
            driver.call,
            {"cmd": "connect", "url": f"ws://127.0.0.1:{server.port}/socket.io/", "clients": cfg.clients,
             "groups": cfg.groups, "tokenPrefix": cfg.token_prefix},
            "connected",
            300.0,
        )
        n = connect["count"]
        if not await warm_up(redis, driver, cfg, n):
            raise RuntimeError("clients did not all join their rooms")
        await asyncio.sleep(2.0)
        rss_after = settled_rss(server.pid)
        server.process.send_signal(signal.SIGUSR1)
        after = wait_snapshot(snapshots, 1)
    finally:
        if driver is not None:
            driver.close()
        server.stop()
        await redis.aclose()
        redis_server.cleanup()

    print(f"{n} idle connections")
    print_growth(after.compare_to(before, "lineno"), n, "connection", rss_after - rss_before, args.top,
                 ("channels_", "engineio", "socketio", "websockets", "uvicorn", "redis", "asyncio", "starlette",
                  "uvloop"))


def print_growth(stats, n: int, unit: str, rss_growth: int, top: int, packages: tuple[str, ...],
                 whole_traceback: bool = False) -> None:
    """RSS and heap growth per `unit`, the `top` allocation sites (their
    first frame, or every frame), and the growth by package."""
    traced = sum(s.size_diff for s in stats)
    print(f"RSS growth:         {rss_growth / n / 1024:7.1f} KiB per {unit}"
          " (RSS includes tracemalloc's own bookkeeping)")
    print(f"Python heap growth: {traced / n / 1024:7.1f} KiB per {unit} (tracemalloc)")
    print(f"\ntop {top} allocation sites, bytes per {unit}:")
    for s in stats[:top]:
        frames = s.traceback if whole_traceback else s.traceback[:1]
        where = " <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno}" for f in frames)
        print(f"  {s.size_diff / n:9.0f} B  {s.count_diff / n:6.1f} blocks  {where}")
    print_by_package(stats, n, unit, packages)


def print_by_package(stats, n: int, unit: str, packages: tuple[str, ...]) -> None:
    """The snapshot difference summed by the first path part naming one of
    `packages` (else the file's name), per `unit`, the twelve largest."""
    by_file: dict[str, int] = {}
    for s in stats:
        parts = Path(s.traceback[0].filename).parts
        key = next((p for p in parts if p.startswith(packages)), parts[-1])
        by_file[key] = by_file.get(key, 0) + s.size_diff
    print(f"\nby package, bytes per {unit}:")
    for key, size in sorted(by_file.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {size / n:9.0f} B  {key}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=2000)
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if args.serve:
        sys.argv = [sys.argv[0]]
        serve_traced()
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
