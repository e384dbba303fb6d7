"""This instance's registrations as a member of the documents open here:
registering with each load, renewing them all, and the removals the
appender carries when a document leaves (a load waits for one on its way).

A crashed instance gets no more writes once its registrations expire.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable

from redis.exceptions import NoScriptError, RedisError

from ..snapshot import LOAD_SCRIPT, REGISTER_SCRIPT, Keys, Loaded, parse_loaded
from .positions import Positions
from .scripts import Script

log = logging.getLogger("channels.collab.cluster")

# A registration as a member of an open document lasts this long and is
# renewed this often (one pipeline for every open document).
MEMBER_TTL_MS = 60_000
MEMBER_REFRESH_SECONDS = 15.0
# Documents per registration script call.
REGISTER_BATCH = 500


class Membership:
    def __init__(self, redis, keys: Keys, inbox: str, instance: bytes, positions: Positions,
                 changed: Callable[[], None], member_ttl_ms: int = MEMBER_TTL_MS):
        self.redis = redis
        self.keys = keys
        self.inbox = inbox
        self._instance_b = instance
        self.positions = positions
        self._changed = changed
        self.member_ttl_ms = member_ttl_ms
        self._load = Script(LOAD_SCRIPT)
        self._register = Script(REGISTER_SCRIPT)
        # Documents left here whose membership is still to be removed, and
        # those whose removal is on its way (a load waits for it to land).
        self._unregister: set[str] = set()
        self._unregistering: set[str] = set()

    @property
    def inbox_ttl_ms(self) -> int:
        # The inbox outlives the registrations that fill it.
        return 2 * self.member_ttl_ms

    async def load(self, name: str) -> Loaded:
        """Register, then read the snapshot and the log after it, atomically."""
        k = self.keys
        self._unregister.discard(name)
        while name in self._unregistering:
            await asyncio.sleep(0.005)  # a removal on its way must not land after this registration
        reply = await self._load.run(self.redis, [self.inbox, k.members(name), k.snap(name), k.log(name)],
                                     [self._instance_b, self.member_ttl_ms, self.inbox_ttl_ms])
        return parse_loaded(reply)

    # ------------------------------------------------------------ removals

    def leave(self, names) -> None:
        """No more updates of `names` to this inbox (left to expire if Redis is down)."""
        self._unregister.update(names)

    @property
    def leaving(self) -> bool:
        return bool(self._unregister)

    def take_leaving(self, limit: int) -> list[str]:
        """Removals for the next pipeline (on their way until `sent`)."""
        if not self._unregister:
            return []
        batch = list(itertools.islice(self._unregister, limit))
        self._unregister.difference_update(batch)
        self._unregistering.update(batch)
        return batch

    def sent(self, batch: list[str], ok: bool) -> None:
        self._unregistering.difference_update(batch)
        if not ok:
            # Still to remove, unless opened here again meanwhile.
            self._unregister.update(n for n in batch if not self.positions.is_open(n))

    # ------------------------------------------------------------ renewals

    async def run(self) -> None:
        while True:
            await asyncio.sleep(MEMBER_REFRESH_SECONDS * (0.9 + random.random() / 5))
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.debug("membership refresh failed", extra={"error": str(exc)})

    async def refresh(self) -> None:
        """Renew this instance's registration on every document open here,
        and its inbox's TTL. A registration that had lapsed (a stall longer
        than its TTL) or an inbox gone means updates may have been missed:
        those documents catch up from their logs."""
        names = self.positions.loaded_names()
        if not names:
            return  # the next load registers again, and creates the inbox
        batches = [names[i:i + REGISTER_BATCH] for i in range(0, len(names), REGISTER_BATCH)]
        sha = await self._register.sha(self.redis)
        pipe = self.redis.pipeline(transaction=False)
        for batch in batches:
            keys = [self.inbox, *(self.keys.members(n) for n in batch)]
            pipe.evalsha(sha, len(keys), *keys, self._instance_b, self.member_ttl_ms, self.inbox_ttl_ms)
        try:
            replies = await pipe.execute()
        except NoScriptError:
            self._register.forget()
            raise
        missed: list[str] = []
        followed = self.positions.inbox_cursor is not None
        for batch, alive in zip(batches, replies, strict=True):
            inbox_lost = not alive[0] and followed
            missed += [n for n, live in zip(batch, alive[1:], strict=False) if inbox_lost or not live]
        if missed:
            self.positions.catch_up(missed)
            log.info("registration lapsed or inbox gone; catching up from the logs",
                     extra={"documents": len(missed)})
            self._changed()
