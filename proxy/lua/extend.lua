-- extend.lua: a proxy's periodic checkpoint of the requests it is serving. Pushes back
-- each reservation's expiry, so the reaper (which closes reservations of dead proxies)
-- leaves it alone, and records what a stream has delivered so far, so a proxy killed
-- mid-stream still charges it (reap.lua).
-- ARGV (after ctx, clock offset): 3.. groups of four: request id,
-- exact cost so far (whole micro-USD, fine units as in settle.lua), usage JSON so far
-- ('' = no progress to record, only extend).
-- keys: acct resv
-- reply: extended
local now = now_ms()
local extended = 0
for i = 3, #ARGV, 4 do
  local raw = redis.call('HGET', K.resv, ARGV[i])
  if raw then
    local r = cjson.decode(raw)
    r.exp = now + CTX.ttl_ms
    if ARGV[i + 3] ~= '' then
      -- kept as strings: cjson would print a 15-digit number with 14 significant digits
      r.ck = {w = ARGV[i + 1], f = ARGV[i + 2], u = cjson.decode(ARGV[i + 3])}
    end
    redis.call('HSET', K.resv, ARGV[i], cjson.encode(r))
    extended = extended + 1
  end
end
return reply({extended})
