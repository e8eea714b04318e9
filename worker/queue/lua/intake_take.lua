-- Take up to ARGV[1] messages from the intake lists into a consumer's processing list (each
-- list's oldest first, the lists in the order given), then return the processing list. An
-- idle pass is this script and one EXISTS, so an idle intake costs Redis next to nothing.
-- KEYS: the consumer's processing list, then the intake lists. ARGV: how many to take at most.
-- Returns the processing list, newest first (what an earlier pass took and left included).
if redis.call('EXISTS', unpack(KEYS)) == 0 then return {} end
local room = tonumber(ARGV[1])
for i = 2, #KEYS do
  while room > 0 and redis.call('LMOVE', KEYS[i], KEYS[1], 'RIGHT', 'LEFT') do
    room = room - 1
  end
end
return redis.call('LRANGE', KEYS[1], 0, -1)
