--! lifecycle
-- Store a running record with the text so far; never over a final one (returns 0 then, else 1).
-- KEYS: result. ARGV: running json, ttl.
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
