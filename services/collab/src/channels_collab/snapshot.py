"""A document's durable home in Redis: its keys, and the two scripts that
read and compact it.

Per document (the name in a hash tag, so its keys share a cluster slot):
- `{prefix}{name}:log`: append-only stream of raw client updates, fields
  `i` (writing instance) and `u` (update bytes), plus trim markers (field
  `t`, the snapshot id the trim went up to);
- `{prefix}{name}:snap`: hash of `state` (merged Yjs update) and `id`, the
  last stream id whose update the state contains;
- `{prefix}{name}:lease`: who compacts right now (only saves duplicate work).

And one `{prefix}feed`, a capped stream every instance reads (one key per
XREAD however many documents are open): each appended update again, with
its document (`d`) and log id (`e`), in log order (one script writes both),
and awareness (`a`) and awareness queries (`q`), which are never part of any
document's history. Its cap bounds it; a reader that falls behind it catches
up from the documents' logs.

Invariant: the snapshot's state contains every update with id <= its `id`,
and the log holds every update with a greater id. Compaction moves the
snapshot forward only (the script compares ids), so two compactors at once
cannot move it back, and trims exactly what the new snapshot covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ZERO_ID = "0-0"

# Returns {state|false, snapshot id|false, tail entries}.
LOAD_SCRIPT = """
local snap = redis.call('HMGET', KEYS[1], 'state', 'id')
local tail
if snap[2] then
  tail = redis.call('XRANGE', KEYS[2], '(' .. snap[2], '+')
else
  tail = redis.call('XRANGE', KEYS[2], '-', '+')
end
return {snap[1] or false, snap[2] or false, tail}
"""

# KEYS: log, feed. ARGV: instance, update, ttl ms (0: leave the TTL), feed
# cap, document name. Returns the log id.
APPEND_SCRIPT = """
local id = redis.call('XADD', KEYS[1], '*', 'i', ARGV[1], 'u', ARGV[2])
if ARGV[3] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'd', ARGV[5], 'e', id, 'i', ARGV[1], 'u', ARGV[2])
return id
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

    def feed(self) -> str:
        return f"{self.prefix}feed"

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
