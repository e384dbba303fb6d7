"""A document's durable home in Redis: its keys, and the scripts that
register, load, append to and compact it.

Per document (the name in a hash tag, so its keys share a cluster slot):
- `{prefix}{name}:log`: append-only stream of raw client updates, fields
  `i` (writing instance) and `u` (update bytes), plus trim markers (field
  `t`, the snapshot id the trim went up to);
- `{prefix}{name}:snap`: hash of `state` (merged Yjs update) and `id`, the
  last stream id whose update the state contains;
- `{prefix}{name}:lease`: who compacts right now (only saves duplicate work);
- `{prefix}{name}:members`: sorted set of the instances that have it open,
  scored by when their registration expires (ms, Redis clock); each
  registers before it loads, so what is appended later reaches its inbox.

And per instance one `{prefix}inbox:{instance}`, a capped stream only its
owner reads (one key per XREAD however many documents are open): each
update appended by another instance to a document open here, with its
document (`d`) and log id (`e`), in log order (the append script writes the
log and the inboxes), and awareness (`a`) and awareness queries (`q`),
which are never part of any document's history. A reader that falls behind
its cap catches up from the documents' logs. The scripts name the inboxes
themselves (from the members set), so they need one Redis, not a Redis
Cluster.

Invariant: the snapshot's state contains every update with id <= its `id`,
and the log holds every update with a greater id. Compaction moves the
snapshot forward only (the script compares ids), so two compactors at once
cannot move it back, and trims exactly what the new snapshot covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ZERO_ID = "0-0"

# Registers `me` as a member of each document whose members key is in
# `members` for `member_ttl` ms, and keeps `inbox` alive for `inbox_ttl` ms
# (created with a hello entry `h`, so that it never exists without a TTL).
# Returns {inbox existed, then per document: `me` was a live member}.
_REGISTER = """
local function register(inbox, members, me, member_ttl, inbox_ttl)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local alive = {redis.call('EXISTS', inbox)}
  if alive[1] == 0 then
    redis.call('XADD', inbox, '*', 'h', me)
  end
  redis.call('PEXPIRE', inbox, inbox_ttl)
  for i = 1, #members do
    local score = redis.call('ZSCORE', members[i], me)
    alive[i + 1] = (score and tonumber(score) > now) and 1 or 0
    redis.call('ZADD', members[i], now + tonumber(member_ttl), me)
    redis.call('PEXPIRE', members[i], inbox_ttl)
  end
  return alive
end
"""

# KEYS: inbox, members of each document. ARGV: instance, member ttl ms,
# inbox ttl ms. Returns {inbox existed, was live per document}.
REGISTER_SCRIPT = _REGISTER + """
local members = {}
for i = 2, #KEYS do
  members[i - 1] = KEYS[i]
end
return register(KEYS[1], members, ARGV[1], ARGV[2], ARGV[3])
"""

# KEYS: inbox, members, snap, log. ARGV: as REGISTER_SCRIPT. Registers, then
# returns {state|false, snapshot id|false, tail entries}: atomically, so what
# is appended after it reaches the inbox and what was before is in the tail.
LOAD_SCRIPT = _REGISTER + """
register(KEYS[1], {KEYS[2]}, ARGV[1], ARGV[2], ARGV[3])
local snap = redis.call('HMGET', KEYS[3], 'state', 'id')
local tail
if snap[2] then
  tail = redis.call('XRANGE', KEYS[4], '(' .. snap[2], '+')
else
  tail = redis.call('XRANGE', KEYS[4], '-', '+')
end
return {snap[1] or false, snap[2] or false, tail}
"""

# Appends the fields after `me` (the writer) to the inbox of every live
# member of `members` but `me`, and prunes the expired ones. A writer alone
# in `members` (one instance) costs one ZRANGE.
_DELIVER = """
local function deliver(members, me, prefix, cap, ...)
  local m = redis.call('ZRANGE', members, 0, -1, 'WITHSCORES')
  if #m == 0 or (#m == 2 and m[1] == me) then
    return
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local expired = false
  for i = 1, #m, 2 do
    if tonumber(m[i + 1]) <= now then
      expired = true
    elseif m[i] ~= me then
      redis.call('XADD', prefix .. m[i], 'MAXLEN', '~', cap, '*', ...)
    end
  end
  if expired then
    redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
  end
end
"""

# KEYS: log, members. ARGV: instance, update, ttl ms (0: leave the TTL),
# inbox cap, document name, inbox key prefix. Returns the log id.
APPEND_SCRIPT = _DELIVER + """
local id = redis.call('XADD', KEYS[1], '*', 'i', ARGV[1], 'u', ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
deliver(KEYS[2], ARGV[1], ARGV[6], ARGV[4], 'd', ARGV[5], 'e', id, 'i', ARGV[1], 'u', ARGV[2])
return id
"""

# KEYS: members. ARGV: instance, kind (`a` awareness, `q` query), payload,
# inbox cap, document name, inbox key prefix. Never touches the history.
AWARENESS_SCRIPT = _DELIVER + """
deliver(KEYS[1], ARGV[1], ARGV[6], ARGV[4], 'd', ARGV[5], 'i', ARGV[1], ARGV[2], ARGV[3])
return 0
"""

# KEYS: snap, log. ARGV: state, id, ttl ms. Returns 1 written, 0 stale.
COMPACT_SCRIPT = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local current = redis.call('HGET', KEYS[1], 'id')
local ms, seq = parse(ARGV[2])
if current then
  local cms, cseq = parse(current)
  if ms < cms or (ms == cms and seq <= cseq) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    return 0
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'id', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%.0f-%.0f', ms, seq + 1))
  -- Tells a reader whose position is before ARGV[2] that it missed entries.
  redis.call('XADD', KEYS[2], '*', 't', ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def parse_id(value: str | bytes) -> tuple[int, int]:
    """A stream id as a comparable pair; ValueError for anything else."""
    if isinstance(value, bytes):
        value = value.decode("ascii")
    ms, _, seq = value.partition("-")
    if not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream id: {value[:40]!r}")
    return int(ms), int(seq)


def id_text(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


class Keys:
    """Key names under one prefix (Loomio's Redis is shared with Rails)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str):
        self.prefix = prefix

    def log(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}:log"

    def snap(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}:snap"

    def members(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}:members"

    def inbox_prefix(self) -> str:
        return f"{self.prefix}inbox:"

    def inbox(self, instance: str) -> str:
        return f"{self.inbox_prefix()}{instance}"

    def lease(self, name: str) -> str:
        return f"{self.prefix}{{{name}}}:lease"


@dataclass(slots=True)
class Loaded:
    """What one load script call returned, parsed: start from `state`, apply
    `updates` in order, then read the log after `cursor`."""

    state: bytes | None
    snapshot_id: str | None
    updates: list[bytes] = field(default_factory=list)
    cursor: str = ZERO_ID


def fields_of(raw) -> dict[bytes, bytes]:
    """A stream entry's field list (flat list or dict) as a dict."""
    if isinstance(raw, dict):
        return raw
    it = iter(raw or ())
    return {k: v for k, v in zip(it, it, strict=False)}


def parse_loaded(reply) -> Loaded:
    """The load script's reply. Trim markers are skipped."""
    state, snap_id, tail = reply
    snap_id = id_text(snap_id) if snap_id else None
    loaded = Loaded(state=state or None, snapshot_id=snap_id, cursor=snap_id or ZERO_ID)
    for entry_id, raw in tail or ():
        update = fields_of(raw).get(b"u")
        if update:
            loaded.updates.append(update)
        loaded.cursor = id_text(entry_id)
    return loaded
