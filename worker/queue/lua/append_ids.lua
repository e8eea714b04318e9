-- Append a chunk of request ids to a job's submission order, once per chunk token (a pipeline
-- replayed after a lost reply appends nothing twice).
-- KEYS: the job's ids list, the job's appended-chunk tokens (set). ARGV: ttl, chunk token,
-- then the ids.
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  for i = 3, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
