-- Give back the intake lists of consumers that stopped beating: each one's processing list is
-- moved onto the intake queue where it is taken next (oldest taken first), and the consumer is
-- forgotten. One script, so two live consumers never both move one list.
-- KEYS: the consumers set, the intake queue. ARGV: none. Returns how many messages moved.
local moved = 0
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', 'genq:intake:alive:' .. name) == 0 then
    local list = 'genq:intake:processing:' .. name
    while redis.call('LMOVE', list, KEYS[2], 'LEFT', 'RIGHT') do moved = moved + 1 end
    redis.call('SREM', KEYS[1], name)
  end
end
return moved
