-- A start handed back unfinished by a worker that stops on purpose (warm shutdown): it never
-- counts. Idempotent. Returns 1.
-- KEYS: attempts, starts. ARGV: start token.
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  if redis.call('DECR', KEYS[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
return 1
