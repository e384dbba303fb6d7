-- One relayed message into its room's log; returns its offset, the same on every instance.
-- KEYS: last-offset, room stream, dedup hash, room trim mark
-- ARGV: me, start_ms (negative: the caller has seen every occurrence of this key), serial, event, data,
--       window_ms, dedup_ms, now_ms|'', keep, max per room (0: no cap)
local now = now_ms(ARGV[8])
local fc, fs = 'c:' .. ARGV[1], 's:' .. ARGV[1]
local st = redis.call('HMGET', KEYS[3], 'n', fc, fs)
local n = tonumber(st[1]) or 0
local c = tonumber(st[2])
if c and st[3] == ARGV[3] then
  -- the client retried a call whose reply was lost
  local again = redis.call('HGET', KEYS[3], 'o:' .. c)
  if again then return again end
end
if not c then
  local start = tonumber(ARGV[2])
  if start < 0 then
    -- the key is one epoch's: its first occurrence is the caller's first sighting
    c = 0
  else
    -- first sighting by this instance: occurrences logged before it listened are not its own
    c = n
    while c > 0 do
      local t = tonumber(redis.call('HGET', KEYS[3], 't:' .. c))
      if not t or t < start then break end
      c = c - 1
    end
  end
end
c = c + 1
if c <= n then
  local off = redis.call('HGET', KEYS[3], 'o:' .. c)
  if off then
    redis.call('HSET', KEYS[3], fc, c, fs, ARGV[3])
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
    return off
  end
  c = n + 1
end
local ms, seq = 0, 0
local last = redis.call('GET', KEYS[1])
if last then
  local dash = string.find(last, '-', 1, true)
  ms = tonumber(string.sub(last, 1, dash - 1))
  seq = tonumber(string.sub(last, dash + 1))
end
if now > ms then ms = now; seq = 0 else seq = seq + 1 end
local id = string.format('%d-%d', ms, seq)
local window = tonumber(ARGV[6])
local minid = now - window
if minid < 0 then minid = 0 end
redis.call('XADD', KEYS[2], 'MINID', '~', string.format('%d', minid), id, 'e', ARGV[4], 'd', ARGV[5])
local cap = tonumber(ARGV[10] or '0')
if cap > 0 and redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', cap) > 0 then
  -- entries before the first one kept may have been missed by someone
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1][1]
  redis.call('SET', KEYS[4], first, 'PX', window)
end
redis.call('PEXPIRE', KEYS[2], window)
redis.call('SET', KEYS[1], id)
redis.call('HSET', KEYS[3], 'n', c, 'o:' .. c, id, 't:' .. c, string.format('%d', now), fc, c, fs, ARGV[3])
local keep = tonumber(ARGV[9])
if c > keep then redis.call('HDEL', KEYS[3], 'o:' .. (c - keep), 't:' .. (c - keep)) end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
return id
