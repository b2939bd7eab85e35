-- charges.lua: drawing a charge from grants, with the carried sub-micro remainder,
-- and giving part of one back.

-- Draw `amount` from the grants that were live at `at` (ms): lower priority first, then
-- earliest expiry (never-expiring last), then oldest. What no grant covers becomes
-- overage debt. Returns the draws ({grant_id, amount}) and the part left as debt.
local function draw_order(a, b)
  if a.priority ~= b.priority then return a.priority < b.priority end
  local ea = a.expires_at == 0 and math.huge or a.expires_at
  local eb = b.expires_at == 0 and math.huge or b.expires_at
  if ea ~= eb then return ea < eb end
  if a.created_at ~= b.created_at then return a.created_at < b.created_at end
  if (a.seq or 0) ~= (b.seq or 0) then return (a.seq or 0) < (b.seq or 0) end
  return a.id < b.id
end

local function draw(amount, at)
  local candidates = {}
  for _, gid in ipairs(redis.call('SMEMBERS', K.live)) do
    local g = get_grant(gid)
    if (g.status == 'active' or g.status == 'expiring') and tonumber(g.remaining) > 0
       and g.effective_at <= at and (g.expires_at == 0 or g.expires_at > at) then
      candidates[#candidates + 1] = g
    end
  end
  table.sort(candidates, draw_order)
  local draws, left = {}, amount
  for _, g in ipairs(candidates) do
    if left == 0 then break end
    local take = math.min(left, tonumber(g.remaining))
    left = left - take
    g.remaining = fmt(tonumber(g.remaining) - take)
    g.drawn = fmt(tonumber(g.drawn) + take)
    if g.status == 'expiring' then acct_incr('held', fmt(-take)) end
    if tonumber(g.remaining) == 0 then
      if g.status == 'expiring' then g.status = 'expired'; g.expired = '0' else g.status = 'depleted' end
      redis.call('SREM', K.live, g.id)
    end
    put_grant(g)
    draws[#draws + 1] = {grant_id = g.id, amount = fmt(take)}
  end
  if left > 0 then acct_incr('debt', fmt(left)) end
  return draws, left
end

-- Give back part of an earlier charge (a late settlement below what the reaper charged
-- from a checkpoint): overage debt first, then the grants it was drawn from, newest draw
-- first, while they are still usable. What a grant that has since expired or been
-- voided would have lost anyway is not returned. Returns the amount given back.
local function credit_back(amount, draws, now)
  local left = amount
  local pay = math.min(acct_num('debt'), left)
  if pay > 0 then acct_incr('debt', fmt(-pay)); left = left - pay end
  for i = #draws, 1, -1 do
    if left == 0 then break end
    local g = get_grant(draws[i].grant_id)
    local usable = (g.status == 'active' or g.status == 'depleted') and (g.expires_at == 0 or g.expires_at > now)
    local give = math.min(left, tonumber(draws[i].amount))
    if usable and give > 0 then
      g.remaining = fmt(tonumber(g.remaining) + give)
      g.drawn = fmt(tonumber(g.drawn) - give)
      if g.status == 'depleted' then g.status = 'active'; redis.call('SADD', K.live, g.id) end
      put_grant(g)
      left = left - give
    end
  end
  return amount - left
end

-- Charge a request's exact cost, `whole` micro-USD plus `fine` units (1e-15 micro-USD,
-- 0 <= fine < CTX.fine): rounded half-up with the account's carried remainder (carry in
-- [-fine/2, fine/2)), so an account's charges add up to its exact costs within one
-- micro-USD. Drawn from the grants live at `at`; the rest becomes overage debt. A
-- negative charge is credited back (credit_back). Appends `entry` with amount, the exact
-- cost (exact_micro, exact_fine) and the draws; a charge above `limit` (its reservation)
-- is flagged `reservation_exceeded`. The entry's API key (`key_id`) counts it in its
-- spend (lib/keys.lua; `counted_at`: when the charge this corrects was counted). Returns
-- the charge, entry id, balance. (`members`: as ledger_add's.)
local function charge(whole, fine, at, entry, now, earlier_draws, limit, counted_at, members)
  local carry = acct_num('carry') + fine
  local charged = whole
  if carry >= CTX.fine / 2 then charged = whole + 1; carry = carry - CTX.fine end
  if limit and charged > limit then entry.reservation_exceeded = true end
  if carry ~= acct_num('carry') then acct_set('carry', fmt(carry)) end
  entry.exact_micro, entry.exact_fine = fmt(whole), fmt(fine)
  entry.amount = 0
  if charged > 0 then
    local draws, left = draw(charged, at)
    if left > 0 then acct_incr('overage_total', fmt(left)); entry.overage = fmt(left) end
    if #draws > 0 then entry.grant_id = draws[1].grant_id; entry.draws = draws end
    entry.amount = -charged
  elseif charged < 0 then
    local back = credit_back(-charged, earlier_draws or {}, now)
    if back < -charged then entry.not_returned = fmt(-charged - back) end
    entry.amount = back
    recompute_next_change(now)  -- a grant given back may be live again
  end
  if charged ~= 0 then acct_incr('lifetime_consumed', fmt(charged)) end
  key_charged(entry.key_id, -entry.amount, now, counted_at)
  local id, balance = ledger_add(entry, now, members)
  return charged, id, balance
end

-- A reservation just closed: an `expiring` grant it held back may now expire.
local function recheck_held(now)
  if acct_num('held') > 0 then acct_set('next_change_ms', fmt(now)) end
end

local function available()
  return acct_num('balance') - acct_num('reserved') - acct_num('held') + overage_room()
end
