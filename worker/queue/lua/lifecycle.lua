-- The request lifecycle for the scripts marked "--! lifecycle" (worker/queue/scripts.py puts
-- this first). FINAL, the final statuses, is defined before it from worker/lifecycle.py.
local final = {}
for _, s in ipairs(FINAL) do final[s] = true end

-- Whether a stored result record (JSON, or false when absent) is in a final status.
local function is_final(raw)
  if not raw then return false end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok then return false end
  return final[doc['status']] == true
end

-- Push a job's webhook event, once, when every request of the job (a hash: total and one
-- count per final status) ended, it is no longer validating, and it has a webhook (its own,
-- or GENQ_WEBHOOK_URL's while `global`).
local function notify_job(job, jid, global)
  local f = redis.call('HMGET', job, 'total', unpack(FINAL))
  local ended = 0
  for i = 2, #f do ended = ended + (tonumber(f[i]) or 0) end
  if ended >= (tonumber(f[1]) or 0) and redis.call('HGET', job, 'state') ~= 'validating'
     and (redis.call('HEXISTS', job, 'webhook') == 1 or global)
     and redis.call('HSETNX', job, 'notified', 1) == 1 then
    redis.call('LPUSH', 'genq:events', cjson.encode({type = 'job', id = jid}))
  end
end
