"""Whether this instance's Redis works: the appender's and the reader's
liveness flags, the one warning per outage, and the one configuration check.

Also the two helpers every Redis task shares: backoff and cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random

from redis.exceptions import RedisError

log = logging.getLogger("channels.collab.cluster")


class Health:
    """Appends and reads work (each task sets its own flag); `ever_failed`
    once Redis was unreachable since start."""

    def __init__(self, redis):
        self.redis = redis
        self.append_ok = True
        self.reader_live = False
        self.ever_failed = False
        self._checked = False

    def failed(self, what: str, exc: BaseException) -> None:
        if not self.ever_failed or self.append_ok or self.reader_live:
            log.warning("redis unreachable; edits wait in memory", extra={"what": what, "error": str(exc)[:200]})
        self.ever_failed = True

    async def check_config_once(self) -> None:
        if not self._checked:
            self._checked = True
            await self.check_redis_config()

    async def check_redis_config(self) -> None:
        """Warn once when Redis may evict or lose drafts."""
        try:
            memory = await self.redis.info("memory")
            persistence = await self.redis.info("persistence")
        except (RedisError, OSError) as exc:
            log.info("could not read the Redis configuration", extra={"error": str(exc)[:200]})
            return
        policy = str(memory.get("maxmemory_policy", "unknown"))
        aof = str(persistence.get("aof_enabled", "0")) == "1"
        save = ""
        try:
            save = (await self.redis.config_get("save")).get(b"save", b"") or b""
            save = save.decode() if isinstance(save, bytes) else str(save)
        except (RedisError, OSError):
            save = "unknown"
        problems = []
        if policy != "noeviction":
            problems.append(f"maxmemory-policy is {policy}: Redis may evict drafts (volatile-* policies too)")
        if not aof and not save.strip():
            problems.append("no persistence (appendonly no, no save points): a Redis restart loses drafts")
        if problems:
            log.warning(
                "redis can lose collab drafts: " + "; ".join(problems)
                + ". Give collab a Redis of its own with appendonly yes and maxmemory-policy noeviction"
                " (acknowledged edits are only as durable as that Redis).",
                extra={"maxmemory_policy": policy, "appendonly": aof},
            )


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): jittered, at most 2 s."""
    return min(2.0, 0.05 * 2 ** min(attempt, 6)) * (0.5 + random.random() / 2)


def raise_if_cancelled() -> None:
    """The redis client may turn a cancellation caught mid-read into a
    connection error; a task being cancelled must still end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
