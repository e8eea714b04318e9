--! lifecycle
-- Mark a request running and count the attempt. Returns the attempt number (1 for the first
-- start), or 0 if the request is already final. Idempotent: a start is counted once per
-- token, so a retried write counts nothing twice.
-- Celery's meta reads STARTED (stored and PUBLISHed on its key's channel, as Celery's Redis
-- result backend does).
-- KEYS: result, attempts, starts, celery meta. ARGV: running json, ttl, job id or '', request
-- id, start token, 1 if it runs alone else 0, STARTED meta json.
if is_final(redis.call('GET', KEYS[1])) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[4], ARGV[7])
if ARGV[3] ~= '' then redis.call('SADD', 'genq:job:' .. ARGV[3] .. ':running', ARGV[4]) end
if redis.call('HSETNX', KEYS[3], ARGV[5], ARGV[6]) == 1 then redis.call('INCR', KEYS[2]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return tonumber(redis.call('GET', KEYS[2]))
