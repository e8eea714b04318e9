-- Settle messages of one intake consumer's processing list: each is removed from the list and,
-- only if it was still there (no live consumer gave it back meanwhile), published on its
-- target list. Replayed after a lost reply, it publishes nothing twice.
-- KEYS: the processing list. ARGV: triples (message as taken, target list or '' for none,
-- message to publish). Returns how many were published.
local published = 0
for i = 1, #ARGV, 3 do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 and ARGV[i + 1] ~= '' then
    redis.call('LPUSH', ARGV[i + 1], ARGV[i + 2])
    published = published + 1
  end
end
return published
