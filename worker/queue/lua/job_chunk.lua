-- Write part of a job being submitted (its ids in order, its new requests' records, owners and
-- webhook URLs) only while the job is `validating`, and see its submitter alive: returns 1
-- (written), 0 (nothing written: the job was reaped or ended) or -1 (nothing written: no such
-- job, it expired). Once per token: a call replayed after a lost reply writes nothing twice
-- and answers 1.
-- KEYS: job, its ids list, its written-part tokens (set), the open-jobs index, then per new
-- request its record, owner and webhook URL keys. ARGV: job id, ttl, token, now, n, the n
-- ids, then per new request its record JSON, owner and webhook URL ('' for none).
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then return 1 end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state ~= 'validating' then return 0 end
local ttl, n = ARGV[2], tonumber(ARGV[5])
for i = 6, 5 + n, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, 5 + n)))
end
local k = 5
for i = 6 + n, #ARGV, 3 do
  redis.call('SET', KEYS[k], ARGV[i], 'EX', ttl)
  if ARGV[i + 1] ~= '' then redis.call('SET', KEYS[k + 1], ARGV[i + 1], 'EX', ttl) end
  if ARGV[i + 2] ~= '' then redis.call('SET', KEYS[k + 2], ARGV[i + 2], 'EX', ttl) end
  k = k + 3
end
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[4], 'XX', ARGV[4], ARGV[1])
return 1
