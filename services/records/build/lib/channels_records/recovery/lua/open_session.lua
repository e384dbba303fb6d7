-- The token lookup and the session in one round trip; the session keeps the
-- user record, its rooms are worked out from it (in Python) if it is restored.
-- KEYS: session, last-offset, the token's current-user key   ARGV: sid, token fingerprint, window_ms
local user = redis.call('GET', KEYS[3])
local off = redis.call('GET', KEYS[2]) or '0-0'
redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'user', user or '', 'tok', ARGV[2], 'off', off)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {off, user}
