-- watch.lua: compare-and-set one account's visit time in a sharded watch zset.
-- Standalone (no lib/): KEYS[1] the shard zset. ARGV: 1 account id, 2 the score the
-- worker saw, 3 the next visit time in ms (0 = nothing left to watch: remove).
-- Only moves the pointer if nobody changed it since it was read, so a reservation or
-- event registered meanwhile is never lost. Returns 1 if changed, 0 otherwise.
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not current or tonumber(current) ~= tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
