"""Where our collab server's memory per loaded document goes.

Runs channels-collab under tracemalloc, loads D documents with the collab
load generator (an editor and an observer, real @hocuspocus/provider v3, on
each), and compares heap snapshots taken before and after: the top
allocation sites per document, next to the RSS growth per document.

    python bench/collab_memprofile.py [--docs 500] [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path.pop(0)
sys.path.insert(0, str(ROOT))

from channels_dev.redis_server import start_local_redis

from bench.memprofile import print_growth, trace_snapshots, wait_snapshot
from bench.processes import NodeDriver, Server, free_port
from bench.procstat import settled_rss
from bench.run import ensure_node_modules, start_rails_stub


def serve_traced() -> None:
    """The server side: channels-collab with a SIGUSR1 heap snapshot."""
    import os

    out = trace_snapshots()
    if os.environ.get("MEMTRACE_REFERRERS"):
        signal.signal(signal.SIGUSR2, lambda _s, _f: _referrers(os.environ["MEMTRACE_REFERRERS"], out))
    from channels_collab.app import main

    sys.exit(main())


def _referrers(type_name: str, out: Path) -> None:
    """Who holds the live objects of one type (a debugging aid)."""
    import gc
    import tracemalloc

    if type_name.startswith("@"):
        # "@file:line": the types of live objects allocated there.
        where = type_name[1:]
        counts: dict[str, int] = {}
        for obj in gc.get_objects():
            tb = tracemalloc.get_object_traceback(obj)
            if tb is not None and f"{tb[-1].filename}:{tb[-1].lineno}".endswith(where):
                counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
        (out / "referrers.txt").write_text("\n".join(f"{n:7d} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])))
        return
    found = [o for o in gc.get_objects() if type(o).__name__ == type_name]
    lines = [f"{len(found)} live {type_name}"]
    for obj in found[:3]:
        for ref in gc.get_referrers(obj):
            if ref is found:
                continue
            lines.append(f"  held by {type(ref).__name__}: {repr(ref)[:200]}")
    (out / "referrers.txt").write_text("\n".join(lines))


async def measure(args) -> None:
    snapshots = Path(tempfile.mkdtemp(prefix="memtrace-"))
    ensure_node_modules()
    redis_server = start_local_redis()
    rails, rails_url = start_rails_stub()
    env = {"REDIS_URL": redis_server.url, "PRIVATE_APP_URL": rails_url, "LOG_LEVEL": "WARNING",
           "MEMTRACE_DIR": str(snapshots), "MEMTRACE_FRAMES": str(args.frames)}
    if args.referrers:
        env["MEMTRACE_REFERRERS"] = args.referrers
    if args.gc:
        env["MEMTRACE_GC"] = "1"
    server = Server("ours-traced", [sys.executable, str(Path(__file__).resolve()), "--serve"], free_port(), env)
    driver = None
    try:
        server.start()
        await asyncio.sleep(1.0)
        rss_before = settled_rss(server.pid)
        server.process.send_signal(signal.SIGUSR1)
        before = wait_snapshot(snapshots, 0)
        driver = NodeDriver("collab.mjs")
        loaded = await asyncio.to_thread(
            driver.call, {"cmd": "load", "url": f"ws://127.0.0.1:{server.port}", "docs": args.docs}, "loaded", 300.0
        )
        n = max(1, loaded["docs"])
        await asyncio.sleep(2.0)
        rss_after = settled_rss(server.pid)
        server.process.send_signal(signal.SIGUSR1)
        after = wait_snapshot(snapshots, 1)
        if args.referrers:
            server.process.send_signal(signal.SIGUSR2)
            await asyncio.sleep(3.0)
            print((snapshots / "referrers.txt").read_text())
    finally:
        if driver is not None:
            driver.close()
        server.stop()
        rails.terminate()
        rails.wait()
        redis_server.cleanup()

    print(f"{n} documents loaded ({loaded.get('failed', 0)} failed), two providers each")
    print_growth(after.compare_to(before, "traceback" if args.traceback else "lineno"), n, "document",
                 rss_after - rss_before, args.top,
                 ("channels_", "pycrdt", "anyio", "redis", "asyncio", "uvloop", "prometheus"),
                 whole_traceback=args.traceback)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--docs", type=int, default=500)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--traceback", action="store_true", help="group by whole traceback, not first frame")
    p.add_argument("--gc", action="store_true", help="collect garbage before each snapshot (what is only cyclic garbage)")
    p.add_argument("--referrers", metavar="TYPE", help="also print what holds live objects of this type")
    args = p.parse_args()
    if args.serve:
        sys.argv = [sys.argv[0]]
        serve_traced()
    asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
