-- Take request messages off the queues for one worker and hold each in kombu's unacked hash
-- and index, as kombu records it (the format: KOMBU_UNACKED in worker/queue/delivery.py).
-- KEYS: the unacked hash and its index, the workers' heartbeat hash, the bulk turn counter, the
-- bulk bell, the owners' lists hash, the set-aside counts, then the interactive lists, then the
-- bulk lists. ARGV: now, how many this worker holds, how many interactive lists, how many it
-- wants of each priority, the adapters it serves (JSON list), then one weight per bulk list.
-- A worker takes at most its share of everything not finished, ceil((queued + held by every
-- worker) / live workers) minus what it holds (at least one when it holds none), so a small job
-- spreads across workers. Live workers are the fresh heartbeats; held messages are kombu's
-- unacked index. Interactive lists are read in order; bulk lists in weighted turns (a list of
-- weight w gets w turns in a round; the turn counter survives between calls), so one owner's
-- backlog never holds another owner's job up. A message for an adapter this worker does not
-- serve is never taken: it is moved once (at most 1000 a call) to `<list>\x06\x17<adapter>`
-- and counted in PARKED_KEY; a worker serving that adapter reads that list first in the turn of
-- `<list>` (it holds older messages), so priority and owner turns hold, and the message goes
-- back to `<list>` when kombu restores it. Each set-aside list is listed in
-- `genq:parked:lists` (read by `delivery.Inbox.parked`, for `link_health.drop_ended_parked`).
-- An owner's list is dropped from the owners' hash when it is empty and nothing pins it
-- (`app.pins_key`: its messages held or set aside, and publishes in flight). Set-aside lists and pins are named in the script, not in KEYS (Redis
-- Cluster is not supported). Returns the number of messages left per priority (set aside included),
-- then tag, raw, list triples; a message that is not a kombu envelope comes back with an empty
-- tag and is not recorded (it is rejected).
local now, mine, ninter = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want_inter, want_bulk = tonumber(ARGV[4]), tonumber(ARGV[5])
local unacked, index, workers, turn, bell, owners, parked =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local first, nlists = 8, #KEYS - 7
local served, serves = cjson.decode(ARGV[6]), {}
for _, a in ipairs(served) do serves[a] = true end
local function aside(key, a) return key .. '\6\23' .. a end
local function pins(key)
  if string.sub(key, 1, 10) == 'genq.bulk.' then return 'genq:pins:' .. key end
end
local live = 0
local beats = redis.call('HGETALL', workers)
for i = 2, #beats, 2 do
  local ok, w = pcall(cjson.decode, beats[i])
  if ok and type(w) == 'table' and tonumber(w['at']) and
     now - tonumber(w['at']) < (tonumber(w['ttl']) or 15) then
    live = live + 1
  end
end
local counts = redis.call('HMGET', parked, 'interactive', 'bulk')
local queued = {tonumber(counts[1]) or 0, tonumber(counts[2]) or 0}
local lens, ready = {}, {}
for i = 0, nlists - 1 do
  local key = KEYS[first + i]
  lens[i] = redis.call('LLEN', key)
  ready[i] = lens[i]
  for _, a in ipairs(served) do ready[i] = ready[i] + redis.call('LLEN', aside(key, a)) end
  local p = i < ninter and 1 or 2
  queued[p] = queued[p] + lens[i]
end
local total = redis.call('ZCARD', index) + queued[1] + queued[2]
local budget = math.ceil(total / math.max(live, 1)) - mine
if mine == 0 and budget < 1 then budget = 1 end
local out, taken, moves = {}, 0, 1000
local function envelope(raw)
  local ok, msg = pcall(cjson.decode, raw)
  if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
    local tag, info = msg['properties']['delivery_tag'], msg['properties']['delivery_info']
    if type(tag) == 'string' and type(info) == 'table' then
      local headers = type(msg['headers']) == 'table' and msg['headers'] or {}
      return tag, info, headers['genq_adapter']
    end
  end
end
local function hold(key, raw, tag, info)
  if tag then
    local ex, rk = info['exchange'] or key, info['routing_key'] or key
    redis.call('HSET', unacked, tag,
               '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', index, now, tag)
    if pins(key) then redis.call('SADD', pins(key), tag) end
  end
  table.insert(out, tag or '')
  table.insert(out, raw)
  table.insert(out, key)
  taken = taken + 1
  return true
end
local function take(key, priority)
  for _, a in ipairs(served) do
    local raw = redis.call('RPOP', aside(key, a))
    if raw then
      redis.call('HINCRBY', parked, priority, -1)
      local tag, info = envelope(raw)
      return hold(key, raw, tag, info)
    end
  end
  while moves > 0 do
    local raw = redis.call('RPOP', key)
    if not raw then return false end
    local tag, info, adapter = envelope(raw)
    if not (tag and type(adapter) == 'string' and not serves[adapter]) then
      return hold(key, raw, tag, info)
    end
    redis.call('LPUSH', aside(key, adapter), raw)
    redis.call('SADD', 'genq:parked:lists', aside(key, adapter))  -- app.PARKED_LISTS_KEY
    redis.call('HINCRBY', parked, priority, 1)
    if pins(key) then redis.call('SADD', pins(key), tag) end
    moves = moves - 1
  end
  return false
end
local n = math.min(want_inter, budget)
for i = 0, ninter - 1 do
  while n > 0 and take(KEYS[first + i], 'interactive') do n = n - 1; budget = budget - 1 end
end
n = math.min(want_bulk, budget)
if want_bulk > 0 then redis.call('DEL', bell) end
local turns, taken_inter = {}, taken
for i = ninter, nlists - 1 do
  if ready[i] > 0 then
    for _ = 1, math.max(1, tonumber(ARGV[7 + i - ninter]) or 1) do
      table.insert(turns, KEYS[first + i])
    end
  end
end
local at = 0
if n > 0 and #turns > 0 then at = tonumber(redis.call('GET', turn) or '0') or 0 end
local misses, empty, start = 0, {}, at
while n > 0 and #turns > 0 and misses < #turns do
  local key = turns[at % #turns + 1]
  at = at + 1
  if not empty[key] and take(key, 'bulk') then
    n = n - 1; budget = budget - 1; misses = 0
  else
    empty[key] = true; misses = misses + 1
  end
end
if at ~= start then redis.call('SET', turn, at) end
for i = ninter, nlists - 1 do
  local key = KEYS[first + i]
  if pins(key) and redis.call('LLEN', key) == 0 and redis.call('SCARD', pins(key)) == 0 then
    redis.call('HDEL', owners, key)
  end
end
local res = {queued[1] - taken_inter, queued[2] - (taken - taken_inter)}
for _, v in ipairs(out) do table.insert(res, v) end
return res
