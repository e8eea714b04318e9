-- Count an owner's new pending requests in only if all fit under the limit: returns the new
-- count, or -1 - the current count (nothing counted). Idempotent per reservation token: the
-- same call replayed (a retry after a lost reply) returns the first answer, counts nothing.
-- KEYS: the owner's pending counter, the reservation's token key. ARGV: how many, the limit
-- (0: none), ttl.
local seen = redis.call('GET', KEYS[2])
if seen then return tonumber(seen) end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local n, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit > 0 and cur + n > limit then return -1 - cur end
redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], cur + n, 'EX', ARGV[3])
return cur + n
