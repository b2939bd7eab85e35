-- extend.lua: push back the expiry of reservations whose requests are still running,
-- so the reaper (which releases reservations of dead proxies) leaves them alone.
-- KEYS: see lib.lua.  ARGV (after ctx, clock offset): 3.. request ids.
-- Returns {extended count}.
local now = now_ms()
local extended = 0
for i = 3, #ARGV do
  local raw = redis.call('HGET', K.resv, ARGV[i])
  if raw then
    local r = cjson.decode(raw)
    r.exp = now + CTX.ttl
    redis.call('HSET', K.resv, ARGV[i], cjson.encode(r))
    extended = extended + 1
  end
end
return reply({extended})
