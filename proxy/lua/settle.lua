-- settle.lua: the ONE settlement script of a metered request; idempotent by request id.
-- Releases the reservation, draws the real cost from the grants that were live at
-- admission (priority, then earliest expiry, never-expiring last, then oldest; the
-- rest becomes overage debt), appends the usage entry, updates lifetime figures,
-- corrects the TPM window to real tokens and raises balance events.
-- KEYS: see lib.lua.  ARGV (after ctx, clock offset):
--   3 request id   4 cost (micro-USD, already rounded)   5 real tokens (input + output)
--   6 entry JSON from the proxy (model, usage, estimated, key_id, ...)
-- Returns {'ok', cost, balance, ledger id} or {'duplicate'} when already settled.
local req_id, cost, real_tokens = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local entry = cjson.decode(ARGV[6])

local raw = redis.call('HGET', K.resv, req_id)
local released = false
if raw then
  redis.call('HDEL', K.resv, req_id)
else
  -- released by the reaper (proxy was presumed dead): still charge, exactly once
  raw = redis.call('HGET', K.reaped, req_id)
  if not raw then return reply({'duplicate'}) end
  redis.call('HDEL', K.reaped, req_id)
  released = true
end
local r = cjson.decode(raw)
local now = now_ms()
if not released then acct_incr('reserved', fmt(-tonumber(r.amount))) end

local draws, left = {}, 0
if cost > 0 then
  draws, left = draw(cost, r.admitted)
  if left > 0 then acct_incr('overage_total', fmt(left)) end  -- overage ever incurred: what invoices count
  acct_incr('lifetime_consumed', fmt(cost))
end

entry.type = entry.type or 'usage'  -- 'release' when nothing is charged
entry.amount = -cost
entry.request_id = req_id
if #draws > 0 then entry.grant_id = draws[1].grant_id; entry.draws = draws end
if left > 0 then entry.overage = fmt(left) end
local id, balance = ledger_add(entry, now)

-- TPM counted the worst case at admission; correct its bucket to the real tokens.
local now_s = math.floor(now / 1000)
if r.sec > now_s - 60 then
  local delta = real_tokens - r.tokens
  local field = 't:' .. fmt(r.sec)
  for _, key in ipairs(r.pm and {K.rl, K.rlm} or {K.rl}) do
    if redis.call('HINCRBY', key, field, delta) < 0 then redis.call('HSET', key, field, 0) end
  end
end

recheck_held(now)
refresh(now)
-- One event per `invoice_every` of overage incurred (a single large request can cross
-- several); repaid debt never makes the same dollars invoiceable twice.
local plan = plan_of_account()
if plan and plan.i and plan.i > 0 then
  local steps = math.floor(acct_num('overage_total') / plan.i)
  for step = acct_num('invoiced_steps') + 1, steps do
    emit('overage.invoice_threshold', {amount_usd = fmt(plan.i), invoiced_through_usd = fmt(step * plan.i),
                                       overage_usd = fmt(acct_num('debt')), invoice_every_usd = fmt(plan.i)}, now)
  end
  if steps > acct_num('invoiced_steps') then acct_set('invoiced_steps', steps) end
end
balance_events(now)
return reply({'ok', cost, balance, id})
