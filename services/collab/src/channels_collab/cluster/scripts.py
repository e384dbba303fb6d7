"""One Lua script as Redis caches it: its SHA, loaded on first use and
again after Redis restarted or was flushed (the sources are in snapshot.py).

Each concern holds the scripts it runs; none shares a cache with another.
"""

from __future__ import annotations

from redis.exceptions import NoScriptError


class Script:
    __slots__ = ("_sha", "source")

    def __init__(self, source: str):
        self.source = source
        self._sha: str | None = None

    async def sha(self, redis) -> str:
        if self._sha is None:
            self._sha = await redis.script_load(self.source)
        return self._sha

    @property
    def loaded(self) -> str | None:
        """Its SHA when known (no round trip needed)."""
        return self._sha

    def forget(self) -> None:
        """Redis said NOSCRIPT: load it again next time."""
        self._sha = None

    async def run(self, redis, keys: list[str], args: list) -> object:
        sha = await self.sha(redis)
        try:
            return await redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # Redis restarted or was flushed: the script cache is empty.
            self.forget()
            sha = await self.sha(redis)
            return await redis.evalsha(sha, len(keys), *keys, *args)
