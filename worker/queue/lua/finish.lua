--! lifecycle
-- Store a final result; the first final state wins (returns 1 if stored, 0 if already final).
-- KEYS: result, celery meta. ARGV: result json, status, ttl, job id or '', request id,
-- meta json. The meta is also PUBLISHed on its key's channel, as Celery's Redis result backend
-- does, so an AsyncResult.get() already waiting returns at once. Gives the owner's pending place back, pushes the request's webhook event, and
-- counts it once in every job it belongs to (its own and any linked by idempotency keys); an
-- expired job is never resurrected by a late finish.
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[6])
local owner = redis.call('GET', 'genq:owner:' .. ARGV[5])
if owner then
  if redis.call('DECR', 'genq:pending:' .. owner) < 0 then
    redis.call('SET', 'genq:pending:' .. owner, 0)
  end
end
local global = redis.call('EXISTS', 'genq:webhooks:global') == 1
local hook = redis.call('GET', 'genq:hook:' .. ARGV[5])
if hook or (global and ARGV[4] == '') then
  redis.call('LPUSH', 'genq:events',
             cjson.encode({type = 'generation', id = ARGV[5], url = hook or ''}))
end
local jobs = redis.call('SMEMBERS', 'genq:rjobs:' .. ARGV[5])
if ARGV[4] ~= '' then table.insert(jobs, ARGV[4]) end
for _, jid in ipairs(jobs) do
  local job = 'genq:job:' .. jid
  if redis.call('EXISTS', job) == 1 then
    redis.call('SREM', job .. ':running', ARGV[5])
    if redis.call('SADD', job .. ':done', ARGV[5]) == 1 then
      redis.call('HINCRBY', job, ARGV[2], 1)
      notify_job(job, jid, global)
    end
  end
end
return 1
