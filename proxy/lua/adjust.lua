-- adjust.lua: a manual correction, recorded as an `adjustment` entry; idempotent by key.
-- A positive amount settles overage debt (e.g. once it has been invoiced and paid); it
-- cannot exceed the debt: credit is added with a grant. A negative amount is a charge,
-- drawn from live grants like usage, the rest becoming debt.
-- ARGV (after ctx, clock offset): 3 JSON {amount (signed micro-USD
-- string), description, idem}.
-- keys: acct grants live resv ledger outbox idem
-- reply ok: ledger_id
-- reply exists: ledger_id
-- reply no_account:
-- reply invalid: reason
local spec = cjson.decode(ARGV[3])
if next(acct()) == nil then return reply({'no_account'}) end
local seen = spec.idem and redis.call('HGET', K.idem, 'adj:' .. spec.idem)
if seen then return reply({'exists', seen}) end
local amount = tonumber(spec.amount)
local now = now_ms()
refresh(now)
local entry = {type = 'adjustment', amount = amount, description = spec.description}
if amount > 0 then
  if amount > acct_num('debt') then
    return reply({'invalid', 'a positive adjustment only settles overage debt; add credit with a grant'})
  end
  acct_incr('debt', fmt(-amount))
else
  local draws, left = draw(-amount, now)
  if #draws > 0 then entry.grant_id = draws[1].grant_id; entry.draws = draws end
  if left > 0 then entry.overage = fmt(left) end
end
local id = ledger_add(entry, now)
if spec.idem then redis.call('HSET', K.idem, 'adj:' .. spec.idem, id) end
balance_events(now)
return reply({'ok', id})
