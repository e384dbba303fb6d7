"""Claims in Redis: which instance posts a room's messages, in which order,
and how far the room is done. docs/bots.md explains the design.

Per room, one hash `{prefix}room:{id}`: `e` its epoch (new whenever the
hash is created, so a hash lost to eviction or a Redis restart is noticed),
`s` the last sequence number given out, `d` the done mark (every message
numbered up to `d` is finished), `o`/`x` the owner and its lease expiry
(Redis time, ms), `g`/`l` when a gap at the head was first seen and the
lowest number any instance still holds. Per message, `{prefix}msg:{txn}`:
its epoch and number, and how many times each instance heard it.

Invariants: at most one owner with an unexpired lease per room; only the
owner moves `d`, one message at a time, after that message is finished;
a number is given out once per epoch; every key expires on its own
(`window`), so nothing outlives the dedupe window.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

# What a claims call raises when Redis cannot answer.
UNAVAILABLE = (RedisError, OSError, TimeoutError)

# The statuses of a room, as the scripts answer them.
OWNER, BUSY, GAP, STALE, EPOCH = "owner", "busy", "gap", "stale", "epoch"


@dataclass(frozen=True, slots=True)
class Registration:
    """A heard message's place: (epoch, seq) in its room, the room's done
    mark, and whether this instance heard the same message before."""

    epoch: str
    seq: int
    done: int
    repeat: bool


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to asking for a room: `status` OWNER (the caller now holds
    the lease), BUSY (another instance does), GAP (the head is held by no one
    the caller knows of; wait), STALE (the caller's lowest is already done),
    EPOCH (the room's state is not the one the caller registered in)."""

    status: str
    epoch: str | None
    done: int
    taken_over: bool = False
    skipped: int = 0


def instance_name() -> str:
    """This process among the instances: host (the pod's name in k8s), pid
    and a random part, so that a restarted process is a new instance."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def room_id(server: str, room: str) -> str:
    return hashlib.sha256(f"{server}\0{room}".encode()).hexdigest()[:32]


def _now_ms() -> str:
    return "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"


# KEYS: room, then one msg key per message. ARGV: instance, fresh epoch,
# window ms, the epoch the caller's other messages of the room are numbered
# in ('' for none), then per message "1" when newly heard. One script for
# the whole batch, so that it is atomic: no other instance's numbering, no
# eviction and no other write falls between two of its messages (numbers in
# one batch follow its order, in one epoch), and a refused batch counts
# nothing as heard. A room whose state is not the expected epoch numbers
# nothing: the caller must number all it keeps again, in order, or a message
# heard later could be numbered before them.
# ARGV[5] is the highest number the caller already holds in that epoch.
#
# A message no instance numbered (its hash absent: evicted, or never heard
# by the instance that numbered the ones after it) gets a number after every
# number given out, so a message heard after it but numbered already (and
# not done) would be posted first: the numbering no longer follows the order
# the caller heard. A full batch (no expected epoch) then starts a new epoch
# numbered in its own order, which the others join (renumbering what they
# keep); a partial batch is refused, so that its caller sends the full one.
# The message has a hash afterwards, so this happens once per message lost to
# eviction or missed by a late subscriber. (A message numbered in an older
# epoch is no such sign: its number is simply later.)
_REGISTER = """
local e = redis.call('HGET', KEYS[1], 'e')
if ARGV[4] ~= '' and e ~= ARGV[4] then return {false} end
if e then
  local d = tonumber(redis.call('HGET', KEYS[1], 'd'))
  local last = tonumber(ARGV[5])
  for i = 2, #KEYS do
    local m = redis.call('HMGET', KEYS[i], 'e', 's')
    if not m[1] then
      last = math.huge
    elseif m[1] == e then
      local seq = tonumber(m[2])
      if seq > d and seq < last then
        if ARGV[4] ~= '' then return {false} end
        redis.call('DEL', KEYS[1])
        e = false
        break
      end
      last = math.max(last, seq)
    end
  end
end
if not e then
  e = ARGV[2]
  redis.call('HSET', KEYS[1], 'e', e, 's', 0, 'd', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local out = {e, tonumber(redis.call('HGET', KEYS[1], 'd'))}
for i = 2, #KEYS do
  local fresh = redis.call('EXISTS', KEYS[i]) == 0
  local heard = 1
  if ARGV[4 + i] == '1' then
    heard = redis.call('HINCRBY', KEYS[i], 'i:' .. ARGV[1], 1)
  end
  local m = redis.call('HMGET', KEYS[i], 'e', 's')
  local seq = m[2]
  if m[1] ~= e then
    seq = redis.call('HINCRBY', KEYS[1], 's', 1)
    redis.call('HSET', KEYS[i], 'e', e, 's', seq)
  end
  if fresh or redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
  out[#out + 1] = tonumber(seq)
  out[#out + 1] = heard
end
return out
"""

# KEYS: room. ARGV: instance, epoch, lowest seq held, lease ms, gap ms, window ms.
_TAKE = _now_ms() + """
local r = redis.call('HMGET', KEYS[1], 'e', 'd', 'o', 'x', 'g', 'l')
if not r[1] then return {'epoch', false, 0, 0, 0} end
if r[1] ~= ARGV[2] then return {'epoch', r[1], tonumber(r[2]), 0, 0} end
local d = tonumber(r[2])
local lowest = tonumber(ARGV[3])
if lowest <= d then return {'stale', r[1], d, 0, 0} end
local owner = r[3] or ''
local mine = owner == ARGV[1]
if owner ~= '' and not mine and tonumber(r[4] or 0) > now then return {'busy', r[1], d, 0, 0} end
local taken = 0
if owner ~= '' and not mine then taken = 1 end
local skipped = 0
if lowest ~= d + 1 then
  local g = tonumber(r[5] or '') or now
  local l = math.min(tonumber(r[6] or '') or lowest, lowest)
  if mine then redis.call('HSET', KEYS[1], 'o', '', 'x', 0) end
  redis.call('HSET', KEYS[1], 'g', g, 'l', l)
  if now - g < tonumber(ARGV[5]) or lowest ~= l then return {'gap', r[1], d, 0, 0} end
  skipped = lowest - d - 1
  d = lowest - 1
  redis.call('HSET', KEYS[1], 'd', d)
end
redis.call('HSET', KEYS[1], 'o', ARGV[1], 'x', now + tonumber(ARGV[4]), 'g', '', 'l', '')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {'owner', r[1], d, taken, skipped}
"""

# KEYS: room. ARGV: instance, epoch, lease ms. 1 when the caller still owns it.
_RENEW = _now_ms() + """
local r = redis.call('HMGET', KEYS[1], 'e', 'o')
if r[1] ~= ARGV[2] or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'x', now + tonumber(ARGV[3]))
return 1
"""

# KEYS: room. ARGV: instance, epoch, seq, lease ms, window ms.
_FINISH = _now_ms() + """
local r = redis.call('HMGET', KEYS[1], 'e', 'o', 'd')
if r[1] ~= ARGV[2] or r[2] ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > tonumber(r[3]) then redis.call('HSET', KEYS[1], 'd', ARGV[3]) end
redis.call('HSET', KEYS[1], 'x', now + tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: room. ARGV: instance, epoch.
_RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'e', 'o')
if r[1] == ARGV[2] and r[2] == ARGV[1] then redis.call('HSET', KEYS[1], 'o', '', 'x', 0) end
return 1
"""


class RedisClaims:
    """The claims of one instance (`instance`, unique per process) in Redis."""

    def __init__(self, redis: Redis, *, instance: str | None = None, prefix: str = "bots:",
                 lease: float = 10.0, window: float = 86400.0, gap: float | None = None):
        self.redis = redis
        self.instance = instance or instance_name()
        self.prefix = prefix
        self.lease = lease
        self.window = window
        # A head nobody claims for this long is given up as lost (holders
        # poll several times per lease, so a live holder claims it first).
        self.gap = lease if gap is None else gap
        self._register = redis.register_script(_REGISTER)
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)

    def _room(self, room: str) -> str:
        return f"{self.prefix}room:{room}"

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease * 1000))

    @property
    def _window_ms(self) -> int:
        return max(1, int(self.window * 1000))

    async def register(self, room: str, messages: list[tuple[str, bool]], expect: str | None = None,
                       floor: int = 0) -> list[Registration] | None:
        """Places for (txn id, newly heard) in one room, in the order given;
        None when the room is no longer in epoch `expect` (in which the
        caller holds numbers up to `floor`), or when a full renumbering is
        needed to keep the order heard (see _REGISTER)."""
        if not messages:
            return []
        reply = await self._register(
            keys=[self._room(room), *(f"{self.prefix}msg:{txn}" for txn, _ in messages)],
            args=[self.instance, uuid.uuid4().hex[:12], self._window_ms, expect or "", floor if expect else 0,
                  *("1" if new else "0" for _, new in messages)],
        )
        if not reply or not reply[0]:
            return None
        epoch, done = _text(reply[0]), int(reply[1])
        return [Registration(epoch, int(reply[i]), done, int(reply[i + 1]) > 1) for i in range(2, len(reply), 2)]

    async def take(self, room: str, epoch: str, lowest: int) -> Grant:
        status, e, d, taken, skipped = await self._take(
            keys=[self._room(room)],
            args=[self.instance, epoch, lowest, self._lease_ms, max(1, int(self.gap * 1000)), self._window_ms],
        )
        return Grant(_text(status), _text(e) if e else None, int(d or 0), bool(taken), int(skipped))

    async def renew(self, room: str, epoch: str) -> bool:
        return bool(await self._renew(keys=[self._room(room)], args=[self.instance, epoch, self._lease_ms]))

    async def finish(self, room: str, epoch: str, seq: int) -> bool:
        return bool(await self._finish(keys=[self._room(room)],
                                       args=[self.instance, epoch, seq, self._lease_ms, self._window_ms]))

    async def release(self, room: str, epoch: str) -> None:
        await self._release(keys=[self._room(room)], args=[self.instance, epoch])

    async def check(self) -> None:
        """A round trip that proves claims can be made, scripts included
        (raises otherwise). It renews a claim nobody has: nothing is written."""
        await self._renew(keys=[self._room("probe")], args=[self.instance, "", 1])


@dataclass
class _LocalRoom:
    epoch: str
    seq: int = 0
    done: int = 0
    owner: str = ""
    until: float = 0.0


@dataclass
class LocalClaims:
    """The same contract in one process's memory: one instance, every room
    its own. For the dispatcher's unit tests (and nothing in production)."""

    instance: str = "local"
    lease: float = 10.0
    clock: callable = time.monotonic
    _rooms: dict[str, _LocalRoom] = field(default_factory=dict)
    _messages: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    async def register(self, room: str, messages: list[tuple[str, bool]], expect: str | None = None,
                       floor: int = 0) -> list[Registration] | None:
        await asyncio.sleep(0)
        if expect and (room not in self._rooms or self._rooms[room].epoch != expect):
            return None
        state = self._rooms.setdefault(room, _LocalRoom(uuid.uuid4().hex[:12]))
        out = []
        for txn, new in messages:
            epoch, seq, heard = self._messages.get(txn, (None, 0, 0))
            if epoch != state.epoch:
                state.seq += 1
                epoch, seq = state.epoch, state.seq
            heard += 1 if new else 0
            self._messages[txn] = (epoch, seq, heard)
            out.append(Registration(epoch, seq, state.done, heard > 1))
        return out

    async def take(self, room: str, epoch: str, lowest: int) -> Grant:
        await asyncio.sleep(0)
        state = self._rooms.get(room)
        if state is None or state.epoch != epoch:
            return Grant(EPOCH, state.epoch if state else None, state.done if state else 0)
        if lowest <= state.done:
            return Grant(STALE, epoch, state.done)
        skipped = lowest - state.done - 1
        state.done = lowest - 1
        state.owner, state.until = self.instance, self.clock() + self.lease
        return Grant(OWNER, epoch, state.done, skipped=skipped)

    async def renew(self, room: str, epoch: str) -> bool:
        state = self._rooms.get(room)
        return state is not None and state.epoch == epoch and state.owner == self.instance

    async def finish(self, room: str, epoch: str, seq: int) -> bool:
        state = self._rooms.get(room)
        if state is None or state.epoch != epoch:
            return False
        state.done = max(state.done, seq)
        return True

    async def release(self, room: str, epoch: str) -> None:
        state = self._rooms.get(room)
        if state is not None and state.epoch == epoch:
            state.owner = ""

    async def check(self) -> None:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
