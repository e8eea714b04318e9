--! lifecycle
-- Every request of the job is queued: it leaves `validating` (returns 1); a job whose requests
-- all ended already (twins of finished requests, fast workers) is notified here. A job no
-- longer validating (reaped: its submitter was too slow) is left as it is (returns 0).
-- KEYS: job, the open-jobs index. ARGV: job id.
if redis.call('HGET', KEYS[1], 'state') ~= 'validating' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('ZREM', KEYS[2], ARGV[1])
notify_job(KEYS[1], ARGV[1], redis.call('EXISTS', 'genq:webhooks:global') == 1)
return 1
