-- reap.lua: release the account's reservations whose TTL passed (their proxy died).
-- Each becomes a zero-amount `release` ledger entry; the reservation is kept in
-- `reaped` so a settlement that still arrives charges it exactly once.
-- KEYS: see lib.lua.  ARGV: ctx, clock offset.
-- Returns {released count, earliest remaining expiry ms (0 = none), outbox length}.
local now = now_ms()
local released, next_exp = 0, 0
local flat = redis.call('HGETALL', K.resv)
for i = 1, #flat, 2 do
  local req_id, r = flat[i], cjson.decode(flat[i + 1])
  if r.exp <= now then
    redis.call('HDEL', K.resv, req_id)
    acct_incr('reserved', fmt(-tonumber(r.amount)))
    redis.call('HSET', K.reaped, req_id, flat[i + 1])
    ledger_add({type = 'release', amount = 0, request_id = req_id, model = r.model,
                description = 'reservation not settled in time; released'}, now)
    released = released + 1
  elseif next_exp == 0 or r.exp < next_exp then
    next_exp = r.exp
  end
end
if released > 0 then
  redis.call('PEXPIRE', K.reaped, 7 * DAY_MS)
  recheck_held(now)
  refresh(now)
end
return reply({released, next_exp, redis.call('LLEN', K.outbox)})
