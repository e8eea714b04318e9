-- Give back places reserved and never queued, once per release token (a replayed call gives
-- nothing back twice); the counter never goes below 0.
-- KEYS: the owner's pending counter, the release's token key. ARGV: how many, ttl.
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[2]) then
  if redis.call('DECRBY', KEYS[1], ARGV[1]) < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
end
return 1
