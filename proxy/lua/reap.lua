-- reap.lua: close the account's reservations whose TTL passed (their proxy died).
-- One with a checkpoint (lua/extend.lua: what a stream had delivered, at most a second
-- before its proxy stopped refreshing it) is charged that, as an estimated `usage`
-- entry; one without is a zero-amount `release` entry. Either way the reservation is
-- kept in `reaped` so a settlement that still arrives charges exactly the rest. The API
-- key's reservation is released here and what is charged counts in its spend; a late
-- settlement counts only the rest (lib/keys.lua).
-- ARGV (after ctx, clock offset): 3 '1' to reap, '0' to only
-- report (after a Redis outage, while proxies replay their journals), 4.. request ids
-- not to reap (settlements this proxy holds in its journal).
-- keys: acct grants live resv ledger outbox reaped kuse
-- reply: closed next_expiry_ms outbox
-- (next_expiry_ms: the earliest remaining expiry, 0 = none; outbox: events waiting)
local now = now_ms()
local reaping = ARGV[3] == '1'
local spared = {}
for i = 4, #ARGV do spared[ARGV[i]] = true end
local released, charged_any, next_exp = 0, false, 0
local flat = redis.call('HGETALL', K.resv)
for i = 1, #flat, 2 do
  local req_id, r = flat[i], cjson.decode(flat[i + 1])
  if reaping and r.exp <= now and not spared[req_id] then
    redis.call('HDEL', K.resv, req_id)
    acct_incr('reserved', fmt(-tonumber(r.amount)))
    key_release(r)
    if r.ck then
      local entry = {type = 'usage', request_id = req_id, model = r.model, key_id = r.key, usage = r.ck.u,
                     estimated = true, reserved = r.amount,
                     description = 'proxy stopped mid-request; charged up to its last checkpoint'}
      local charged = charge(tonumber(r.ck.w), tonumber(r.ck.f), r.admitted, entry, now, nil, tonumber(r.amount))
      r.charged, r.cw, r.cf, r.draws, r.rt = fmt(charged), r.ck.w, r.ck.f, entry.draws, now
      charged_any = true
    else
      ledger_add({type = 'release', amount = 0, request_id = req_id, model = r.model,
                  description = 'reservation not settled in time; released'}, now)
    end
    redis.call('HSET', K.reaped, req_id, cjson.encode(r))
    released = released + 1
  elseif next_exp == 0 or r.exp < next_exp then
    next_exp = r.exp
  end
end
if released > 0 then
  redis.call('PEXPIRE', K.reaped, 7 * DAY_MS)
  recheck_held(now)
  refresh(now)
  if charged_any then balance_events(now) end
end
return reply({released, next_exp, redis.call('LLEN', K.outbox)})
