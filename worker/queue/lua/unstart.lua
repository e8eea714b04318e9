-- A start handed back unfinished by a worker that stops on purpose (warm shutdown): it never
-- counts, and Celery's meta goes back to PENDING (no meta) unless the request ended meanwhile.
-- Idempotent. Returns 1.
-- KEYS: attempts, starts, celery meta. ARGV: start token.
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  if redis.call('DECR', KEYS[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
local meta = redis.call('GET', KEYS[3])
if meta then
  local ok, doc = pcall(cjson.decode, meta)
  if ok and type(doc) == 'table' and doc['status'] == 'STARTED' then redis.call('DEL', KEYS[3]) end
end
return 1
