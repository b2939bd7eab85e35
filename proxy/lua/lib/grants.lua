-- grants.lua: credit grants: records, activation, expiry, voids, plan allocations and
-- the lazy bookkeeping every script runs first (refresh).

local function get_grant(gid) return cjson.decode(redis.call('HGET', K.grants, gid)) end
local function put_grant(g) redis.call('HSET', K.grants, g.id, cjson.encode(g)) end

local function recompute_next_change(now)
  local next_change = 0
  for _, gid in ipairs(redis.call('SMEMBERS', K.live)) do
    local g = get_grant(gid)
    local t = (g.status == 'pending') and g.effective_at or g.expires_at
    if g.status == 'expiring' then t = now + 1000 end  -- re-check, rate-limited
    if t > 0 and (next_change == 0 or t < next_change) then next_change = t end
  end
  acct_set('next_change_ms', fmt(next_change))
end

-- A new grant pays off overage debt first: balance = sum(live remaining) - debt.
local function activate(g, now, entry_type)
  g.status = 'active'
  local amount = tonumber(g.amount)
  local debt = acct_num('debt')
  local pay = math.min(debt, amount)
  if pay > 0 then
    acct_incr('debt', fmt(-pay))
    g.remaining = fmt(amount - pay)
    g.drawn = fmt(tonumber(g.drawn or '0') + pay)
  end
  if g.kind == 'paid' then
    acct_incr('lifetime_paid', fmt(amount))
    if acct_num('first_payment_ms') == 0 then
      acct_set('first_payment_ms', fmt(math.max(g.effective_at, 0)))
    end
  end
  if tonumber(g.remaining) == 0 then g.status = 'depleted'; redis.call('SREM', K.live, g.id) end
  put_grant(g)
  ledger_add({type = entry_type, amount = amount, grant_id = g.id, description = g.description}, now)
  if g.idem and g.idem == acct_get('topup_pending') then
    acct_del('topup_pending')
  end
  emit('credits.granted', {grant_id = g.id, kind = g.kind, amount_usd = g.amount}, now)
end

-- Oldest admission time among open reservations (0 when none).
local function oldest_open_admission()
  local oldest = 0
  for _, raw in ipairs(redis.call('HVALS', K.resv)) do
    local r = cjson.decode(raw)
    if oldest == 0 or r.admitted < oldest then oldest = r.admitted end
  end
  return oldest
end

-- An expired grant's remainder leaves the balance as an `expiration` entry, unless a
-- reservation admitted while it was live is still open: that request may still draw
-- on it (late settlement), so it waits as `expiring`, excluded from availability.
local function expire(g, now)
  local oldest = oldest_open_admission()
  if oldest > 0 and oldest < g.expires_at then
    if g.status ~= 'expiring' then
      g.status = 'expiring'
      put_grant(g)
      acct_incr('held', g.remaining)
    end
    return
  end
  local remaining = tonumber(g.remaining)
  if g.status == 'expiring' then acct_incr('held', fmt(-remaining)) end
  g.status = 'expired'
  g.expired = g.remaining
  g.remaining = '0'
  put_grant(g)
  redis.call('SREM', K.live, g.id)
  if remaining > 0 then
    ledger_add({type = 'expiration', amount = -remaining, grant_id = g.id}, now)
    emit('credits.expired', {grant_id = g.id, amount_usd = fmt(remaining)}, now)
  end
end

-- `seq` orders grants made within one millisecond (draw-down ties, listings).
local function grant_record(id, kind, amount, priority, effective_at, expires_at, now, description, idem)
  return {id = id, kind = kind, amount = fmt(amount), remaining = fmt(amount), drawn = '0',
          priority = priority, effective_at = effective_at, expires_at = expires_at,
          created_at = now, seq = acct_incr('grant_seq', 1), description = description, idem = idem,
          status = 'pending'}
end

-- Grant the plan's allocation once per period, lazily, as a promotional grant that
-- expires at the period's end.
local function allocate(now)
  local plan = plan_of_account()
  if not plan or not plan.allocation or plan.allocation <= 0 then return false end
  local pid, start_ms, end_ms = period(plan.every, now)
  local name = acct_get('plan')
  local gid = 'alloc_' .. name .. '_' .. pid
  if acct_get('alloc_last') == gid then return false end  -- the usual case
  acct_set('alloc_last', gid)
  if redis.call('HEXISTS', K.grants, gid) == 1 then return false end  -- plan switched back and forth
  local g = grant_record(gid, 'promotional', plan.allocation, 0, start_ms, end_ms, now,
                         'plan ' .. name .. ' allocation ' .. pid, nil)
  redis.call('SADD', K.live, g.id)
  activate(g, now, 'allocation')
  recompute_next_change(now)
  return true
end

-- Void a live grant's remainder (a refund, or a plan's allocation when the plan changes).
local function void_grant(g, now, reason)
  local remaining = tonumber(g.remaining)
  local was = g.status
  if was == 'expiring' then acct_incr('held', fmt(-remaining)) end
  g.status = 'voided'
  g.voided = g.remaining
  g.remaining = '0'
  g.void_reason = reason
  put_grant(g)
  redis.call('SREM', K.live, g.id)
  -- a pending grant never entered the balance: its void moves nothing
  local amount = (was == 'pending') and 0 or -remaining
  ledger_add({type = 'void', amount = amount, grant_id = g.id, description = reason}, now)
  if g.kind == 'paid' and was ~= 'pending' then acct_incr('lifetime_paid', fmt(-remaining)) end
end

-- Lazy bookkeeping run at every touch: activate due grants, expire lapsed ones,
-- grant a due plan allocation. Cheap when nothing is due (one HGET).
-- Returns true when it moved the balance (callers then check balance events).
local function refresh(now)
  local next_change = acct_num('next_change_ms')
  local changed = false
  if next_change > 0 and next_change <= now then
    local before = acct_num('balance')
    for _, gid in ipairs(redis.call('SMEMBERS', K.live)) do
      local g = get_grant(gid)
      if g.status == 'pending' and g.effective_at <= now then activate(g, now, 'grant') end
      -- activation may have depleted it (paying off debt): only a live grant can expire
      local live = g.status == 'active' or g.status == 'expiring'
      if live and g.expires_at > 0 and g.expires_at <= now then expire(g, now) end
    end
    recompute_next_change(now)
    changed = acct_num('balance') ~= before
  end
  return allocate(now) or changed
end
