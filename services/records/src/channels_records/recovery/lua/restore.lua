-- KEYS: session, last-offset
-- ARGV: token fingerprint, offset|'', window_ms, max entries, room key prefix, trim mark prefix,
--       rooms json|'' (for a session that kept its user record instead)
-- Returns a status string, {'rooms', user record} when the caller must work
-- out the rooms (and call again with them), or {sid, rooms json, id, event,
-- data, id, event, data, ...} with each room's entries in id order, rooms one
-- after the other, each room's list ended by ''.
local s = redis.call('HMGET', KEYS[1], 'sid', 'rooms', 'tok', 'off', 'user')
if not s[1] then return 'unknown' end
if s[3] ~= ARGV[1] then return 'token' end
local rooms_json = s[2]
if not rooms_json then
  if (ARGV[7] or '') == '' then return {'rooms', s[5] or ''} end
  rooms_json = ARGV[7]
end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local off = s[4]
if ARGV[2] ~= '' then
  local last = redis.call('GET', KEYS[2]) or '0-0'
  if less(last, ARGV[2]) then return 'ahead' end
  -- nothing from before the session existed belongs to it
  if less(off, ARGV[2]) then off = ARGV[2] end
end
local max = tonumber(ARGV[4])
local out = {s[1], rooms_json}
local total = 0
local rooms = cjson.decode(rooms_json)
for _, room in ipairs(rooms) do
  -- the per-room cap removed entries up to the mark: one after the offset
  -- may be among them, and a replay with a hole is no recovery
  local mark = redis.call('GET', ARGV[6] .. room)
  if mark and less(off, mark) then return 'trimmed' end
end
for _, room in ipairs(rooms) do
  local entries = redis.call('XRANGE', ARGV[5] .. room, '(' .. off, '+', 'COUNT', max + 1 - total)
  total = total + #entries
  if total > max then return 'too_many' end
  for _, e in ipairs(entries) do
    local f = e[2]
    out[#out + 1] = e[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[4]
  end
  out[#out + 1] = ''
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return out
