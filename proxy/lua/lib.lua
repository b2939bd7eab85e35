-- lib.lua: helpers prepended to every script (see ledger.py). Not a script itself.
--
-- Units: money is integer micro-USD (1e-6 USD), times are integer milliseconds of
-- Redis TIME. Lua numbers are doubles, exact below 2^53: money is written back with
-- fmt() (never tostring, which prints 1e+15) and kept as strings inside JSON.
--
-- Every script receives the same KEYS, all in one hash slot ({account id}):
--   1 acct    hash   account fields (balance, reserved, debt, lifetime_*, plan, ...)
--   2 grants  hash   grant id -> grant JSON (every grant ever made)
--   3 live    set    ids of pending/active grants
--   4 resv    hash   request id -> open reservation JSON
--   5 ledger  stream append-only entries, field "e" = entry JSON
--   6 outbox  list   webhook events not yet delivered
--   7 keys    hash   api key id -> "active" | "revoked"
--   8 reaped  hash   request id -> reservation JSON released by the reaper
--   9 idem    hash   grant idempotency key -> grant id
--  10 rl      hash   rate window of the account, fields r:<sec> / t:<sec>
--  11 rlm     hash   rate window of the account for one model
-- ARGV[1] is the context JSON built once per config (ledger.py: Context).

local K = {acct = KEYS[1], grants = KEYS[2], live = KEYS[3], resv = KEYS[4],
           ledger = KEYS[5], outbox = KEYS[6], keys = KEYS[7], reaped = KEYS[8],
           idem = KEYS[9], rl = KEYS[10], rlm = KEYS[11]}
local CTX = cjson.decode(ARGV[1])
-- tiers and plans arrive as JSON strings inside the context: most calls need neither,
-- and decoding them into tables is most of the cost of a context
local TIERS, PLANS = nil, nil
local function tiers()
  TIERS = TIERS or cjson.decode(CTX.tiers)
  return TIERS
end
local function plans()
  PLANS = PLANS or cjson.decode(CTX.plans)
  return PLANS
end
local UNLIMITED = 4503599627370496  -- 2^52 micro-USD: "no limit", still exact
local DAY_MS = 86400000

local function fmt(n) return string.format('%d', n) end

local function num(v)
  if v == false or v == nil or v == '' then return 0 end
  return tonumber(v)
end

-- ARGV[2] is a clock offset in ms: 0 in production, moved forward by tests.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end

-- The account hash, read once per script (one HGETALL instead of a HGET per field) and
-- kept in step with every write, which all go through the helpers below.
local A = nil
local function acct()
  if A == nil then
    A = {}
    local flat = redis.call('HGETALL', K.acct)
    for i = 1, #flat, 2 do A[flat[i]] = flat[i + 1] end
  end
  return A
end
local function acct_get(field) return acct()[field] end  -- nil when absent
local function acct_num(field) return num(acct()[field]) end
local function acct_set(field, value)
  redis.call('HSET', K.acct, field, value)
  acct()[field] = tostring(value)
end
local function acct_del(field)
  redis.call('HDEL', K.acct, field)
  acct()[field] = nil
end
local function acct_incr(field, delta)
  local value = redis.call('HINCRBY', K.acct, field, delta)
  acct()[field] = fmt(value)
  return value
end

local function get_grant(gid) return cjson.decode(redis.call('HGET', K.grants, gid)) end
local function put_grant(g) redis.call('HSET', K.grants, g.id, cjson.encode(g)) end

-- Append one ledger entry and move the stored balance by its amount, together:
-- balance == sum(ledger amounts) holds after every script.
local function ledger_add(entry, now)
  local balance = acct_incr('balance', fmt(entry.amount))
  entry.amount = fmt(entry.amount)
  entry.balance = fmt(balance)
  entry.ts = now
  local id = redis.call('XADD', K.ledger, '*', 'e', cjson.encode(entry))
  return id, balance
end

local ACCOUNT_ID = string.match(K.acct, '{(.-)}')  -- the hash tag is the account id
local EMITTED = 0  -- events raised by this call: the caller then asks for a delivery visit

local function emit(kind, data, now)
  if CTX.wh ~= 1 then return end
  local seq = acct_incr('event_seq', 1)
  data.account_id = ACCOUNT_ID
  local id = 'evt_' .. ACCOUNT_ID .. '_' .. fmt(seq)
  redis.call('RPUSH', K.outbox, cjson.encode({id = id, type = kind, ts = now, data = data, tries = 0}))
  EMITTED = EMITTED + 1
end

-- Every reply ends with the number of events raised, so the caller can wake the worker.
local function reply(t)
  t[#t + 1] = EMITTED
  return t
end

-- Calendar periods in UTC, computed from Redis time (no os.date in Redis Lua).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- Returns (period id, start ms, end ms) of the period containing now.
local function period(every, now)
  local days = math.floor(now / DAY_MS)
  if every == 'day' then
    return 'd' .. days, days * DAY_MS, (days + 1) * DAY_MS
  elseif every == 'week' then  -- ISO weeks start on Monday; 1970-01-01 was a Thursday
    local start = days - (days + 3) % 7
    return 'w' .. start, start * DAY_MS, (start + 7) * DAY_MS
  end
  local y, m = civil_from_days(days)
  if every == 'year' then
    return 'y' .. y, days_from_civil(y, 1, 1) * DAY_MS, days_from_civil(y + 1, 1, 1) * DAY_MS
  end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return 'm' .. y .. '-' .. m, days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS
end

local function plan_of_account()
  local name = acct_get('plan')
  if not name or name == '' then return nil end
  return plans()[name]
end

-- How far below zero the balance may go: the account's override, else its plan's.
local function overage_room()
  local override = acct_get('overage_limit')
  if override == 'unlimited' then return UNLIMITED end
  if override and override ~= '' then return tonumber(override) end
  local plan = plan_of_account()
  if plan and plan.o then
    if plan.o < 0 then return UNLIMITED end
    return plan.o
  end
  return 0
end

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
  if not plan or not plan.a or plan.a <= 0 then return false end
  local pid, start_ms, end_ms = period(plan.e, now)
  local name = acct_get('plan')
  local gid = 'alloc_' .. name .. '_' .. pid
  if acct_get('alloc_last') == gid then return false end  -- the usual case
  acct_set('alloc_last', gid)
  if redis.call('HEXISTS', K.grants, gid) == 1 then return false end  -- plan switched back and forth
  local g = grant_record(gid, 'promotional', plan.a, 0, start_ms, end_ms, now,
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
-- is flagged `reservation_exceeded`. Returns the charge, entry id, balance.
local function charge(whole, fine, at, entry, now, earlier_draws, limit)
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
  local id, balance = ledger_add(entry, now)
  return charged, id, balance
end

-- A reservation just closed: an `expiring` grant it held back may now expire.
local function recheck_held(now)
  if acct_num('held') > 0 then acct_set('next_change_ms', fmt(now)) end
end

local function available()
  return acct_num('balance') - acct_num('reserved') - acct_num('held') + overage_room()
end

local function thresholds()
  local own = acct_get('thresholds')
  if own and own ~= '' then return cjson.decode(own) end
  return CTX.th or {}
end

-- Balance events, state-based so each fires once per crossing and re-arms itself.
-- `silent` records the state without raising events: an account that starts at zero has
-- not crossed anything.
local function balance_events(now, silent)
  if CTX.wh ~= 1 then return end
  local function raise(kind, data)
    if not silent then emit(kind, data, now) end
  end
  local balance = acct_num('balance')
  local avail = balance - acct_num('reserved') - acct_num('held') + overage_room()
  for _, t in ipairs(thresholds()) do
    local flag = 'low_fired:' .. fmt(t)
    local fired = (acct_get(flag) ~= nil)
    if balance < t and not fired then
      acct_set(flag, '1')
      raise('credit_balance.low', {threshold_usd = fmt(t), balance_usd = fmt(balance)})
    elseif balance > t and fired then  -- re-armed once the balance rises above it
      acct_del(flag)
    end
  end
  local depleted = (acct_get('depleted_fired') ~= nil)
  if avail <= 0 and not depleted then
    acct_set('depleted_fired', '1')
    raise('credit_balance.depleted', {balance_usd = fmt(balance)})
  elseif avail > 0 and depleted then
    acct_del('depleted_fired')
  end
  local topup = acct_get('auto_topup')
  if topup and topup ~= '' and not silent then
    local cfg = cjson.decode(topup)
    local last = acct_num('topup_last_ms')
    -- an outstanding request blocks new ones until its grant arrives, or for an hour at
    -- least (a declined charge or a dead letter must not stop top-ups for good)
    local outstanding = acct_get('topup_pending')
      and now - last < math.max(CTX.cd or 0, 3600000)
    if balance < tonumber(cfg.threshold) and not outstanding and (last == 0 or now - last >= (CTX.cd or 0)) then
      local n = acct_incr('topup_seq', 1)
      local key = 'topup_' .. ACCOUNT_ID .. '_' .. fmt(n)
      acct_set('topup_pending', key)
      acct_set('topup_last_ms', fmt(now))
      local amount = cfg.target and fmt(tonumber(cfg.target) - balance) or cfg.amount
      emit('auto_topup.requested', {amount_usd = amount, idempotency_key = key,
                                    balance_usd = fmt(balance)}, now)
    end
  end
end

-- The account's tier from its lifetime figures (tiers() ascending by min_usd), kept
-- in the account so a change is noticed once. Returns the tier and its limits, with
-- the account's admin override (rl_rpm / rl_tpm) taking precedence.
local function derive_tier(now)
  local basis = acct_num(CTX.basis == 'consumed' and 'lifetime_consumed' or 'lifetime_paid')
  local first = acct_num('first_payment_ms')
  local chosen = tiers()[1]
  for _, t in ipairs(tiers()) do
    if basis >= t.m and (t.d == 0 or (first > 0 and now - first >= t.d * DAY_MS)) then chosen = t end
  end
  -- While instances run different configs (a staggered reload), only the newest tier
  -- table (CTX.tg, a generation handed out by Redis once per distinct table) may change
  -- the stored tier; older ones apply their limits without flipping it back and forth.
  local gen, stored_gen = CTX.tg or 0, acct_num('tier_gen')
  if gen > stored_gen then acct_set('tier_gen', gen) end
  local prev = acct_get('tier')
  if prev ~= chosen.n and gen >= stored_gen then
    acct_set('tier', chosen.n)
    if prev then emit('tier.changed', {from = prev, to = chosen.n}, now) end
  end
  local rpm, tpm = chosen.r, chosen.t
  local own_rpm, own_tpm = acct_num('rl_rpm'), acct_num('rl_tpm')
  if own_rpm > 0 then rpm = own_rpm end
  if own_tpm > 0 then tpm = own_tpm end
  return chosen.n, rpm, tpm, chosen.mr or 0, chosen.mt or 0
end
