"""The recovery log's Lua scripts (the .lua files beside this module,
package data), run by SHA with a reload when Redis has lost them."""

from __future__ import annotations

import hashlib
from importlib.resources import files

from redis.exceptions import NoScriptError


def lua(*names: str) -> str:
    """The source of one script: the named files, concatenated."""
    folder = files(__package__).joinpath("lua")
    return "".join(folder.joinpath(name).read_text(encoding="utf-8") for name in names)


class Script:
    """EVALSHA with a reload when Redis has lost its script cache (restart,
    SCRIPT FLUSH). redis-py's pipeline script support would check for the
    script on every pipeline, an extra round trip per batch."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, redis) -> None:
        sha = await redis.script_load(self.source)
        self.sha = sha.decode() if isinstance(sha, bytes) else sha

    async def __call__(self, redis, keys: list, args: list):
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


LOG = lua("now.lua", "log.lua")
CREATE_SESSION = lua("create_session.lua")
OPEN_SESSION = lua("open_session.lua")
RESTORE = lua("restore.lua")
