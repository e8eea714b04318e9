--! lifecycle
-- Claim a job whose submitter stopped showing life (its last sign at most ARGV[2]) while it
-- is `validating`, in one step: its total becomes what was queued, the owner's places never
-- queued are given back, its state becomes ARGV[4] (`failed`; its event is pushed if nothing
-- is left to end), and it stays listed at score 0 until the caller has cancelled its queued requests and unlisted it.
-- Returns 1 for a job whose queued requests the caller must cancel: claimed now or before (a
-- call replayed after a lost reply, another reaper, a reaper that died before cancelling);
-- else 0 (alive, or unlisted: a batch resumes its own job; a job gone or no longer open is
-- unlisted).
-- KEYS: job, its ids list, the open-jobs index. ARGV: job id, stale cutoff, error, the job's
-- state once reaped.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'validating' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if not seen or tonumber(seen) > tonumber(ARGV[2]) then return 0 end  -- alive; a batch's
  local queued = redis.call('LLEN', KEYS[2])
  local f = redis.call('HMGET', KEYS[1], 'total', 'owner')
  local back = (tonumber(f[1]) or 0) - queued
  redis.call('HSET', KEYS[1], 'total', queued, 'state', ARGV[4], 'reaped', 1,
             'error', ARGV[3])
  if f[2] and f[2] ~= '' and back > 0 then
    local pending = 'genq:pending:' .. f[2]
    if redis.call('DECRBY', pending, back) < 0 then redis.call('SET', pending, 0, 'KEEPTTL') end
  end
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  notify_job(KEYS[1], ARGV[1], redis.call('EXISTS', 'genq:webhooks:global') == 1)
  return 1
end
if redis.call('HEXISTS', KEYS[1], 'reaped') == 1 then return 1 end
redis.call('ZREM', KEYS[3], ARGV[1])
return 0
