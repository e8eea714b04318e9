--! lifecycle
-- Add a request submitted earlier (same idempotency key) to another job: counted there at
-- once if final, else when it finishes (finish.lua reads genq:rjobs:<id>). Returns 1.
-- KEYS: result. ARGV: job id, request id, ttl.
local raw = redis.call('GET', KEYS[1])
local job = 'genq:job:' .. ARGV[1]
if is_final(raw) then
  if redis.call('SADD', job .. ':done', ARGV[2]) == 1 then
    redis.call('HINCRBY', job, cjson.decode(raw)['status'], 1)
  end
  redis.call('EXPIRE', job .. ':done', ARGV[3])
else
  redis.call('SADD', 'genq:rjobs:' .. ARGV[2], ARGV[1])
  redis.call('EXPIRE', 'genq:rjobs:' .. ARGV[2], ARGV[3])
end
return 1
