-- An OpenAI batch ended while `validating` (a faulty file, a queue with no room, given up,
-- cancelled before anything was queued): push its webhook event, once, if GENQ_WEBHOOK_URL is
-- configured (a batch has no webhook of its own). Its job, if one was made, is marked
-- notified: the batch never sends a second event. Returns 1 if pushed.
-- KEYS: the batch's notified flag, its job. ARGV: batch id, ttl.
if redis.call('EXISTS', 'genq:webhooks:global') == 0 then return 0 end
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[2]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('HSETNX', KEYS[2], 'notified', 1) == 0 then
  return 0
end
redis.call('LPUSH', 'genq:events', cjson.encode({type = 'batch', id = ARGV[1]}))
return 1
