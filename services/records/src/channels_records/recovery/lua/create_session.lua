-- A session with its rooms; returns the connect offset.
-- KEYS: session, last-offset   ARGV: sid, rooms json, token fingerprint, window_ms
local off = redis.call('GET', KEYS[2]) or '0-0'
redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'rooms', ARGV[2], 'tok', ARGV[3], 'off', off)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return off
