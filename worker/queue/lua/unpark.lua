-- Drop messages from a set-aside list (`<list>\x06\x17<adapter>`, see fetch.lua) whose requests
-- ended while they waited there (cancelled, past their deadline): each one still on the list
-- is removed once, its priority's set-aside count goes down and, on an owner's bulk list, its
-- tag no longer pins that list. A message a worker took meanwhile is not on the list and is
-- left alone (so a replay changes nothing). An empty list is unlisted.
-- KEYS: the set-aside list, the set-aside counts hash, the set of set-aside lists.
-- ARGV: the priority (`interactive` or `bulk`), the pins set ('' for none), then tag, raw pairs.
-- Returns how many messages it removed.
local removed = 0
for i = 3, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i + 1]) == 1 then
    removed = removed + 1
    redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
    if ARGV[2] ~= '' then redis.call('SREM', ARGV[2], ARGV[i]) end
  end
end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], KEYS[1]) end
return removed
