-- keys.lua: an API key's settings and spend, kept in the account's slot so admission
-- enforces them atomically and at once on every instance.
--   kset  hash  key id -> settings JSON (keys.py KeySettings): name, models (a JSON
--               array as text), limit (micro-USD), reset (daily|weekly|monthly), exp
--               (ms), rpm, tpm; an absent field is no restriction
--   kuse  hash  'r:' .. key id -> micro-USD reserved by the key's open requests;
--               'u:' .. key id -> spend JSON {t, d, du, w, wu, m, mu}: the total, and
--               the current day's, week's and month's period id and spend (an older
--               period is overwritten when a charge lands in a new one: bounded size)

local RESETS = {daily = 'day', weekly = 'week', monthly = 'month'}
local SPEND_PERIODS = {'day', 'week', 'month'}

local function key_settings(kid)
  local raw = redis.call('HGET', K.kset, kid)
  return raw and cjson.decode(raw) or {}
end

-- Why the key may not be used now (nil: it may): 'revoked' (or unknown) or 'expired'.
local function key_refusal(kid, s, now)
  if redis.call('HGET', K.keys, kid) ~= 'active' then return 'revoked' end
  if s.exp and tonumber(s.exp) <= now then return 'expired' end
  return nil
end

local function key_allows(s, model)
  if not s.models then return true end
  for _, m in ipairs(cjson.decode(s.models)) do
    if m == model then return true end
  end
  return false
end

local function key_spend(kid)
  local raw = redis.call('HGET', K.kuse, 'u:' .. kid)
  return raw and cjson.decode(raw) or {}
end

local function key_reserved(kid) return num(redis.call('HGET', K.kuse, 'r:' .. kid)) end

-- The key's spend in the period of `every` (day, week, month) that contains now.
local function spent_in(u, every, now)
  local p = string.sub(every, 1, 1)
  if u[p] == period(every, now) then return num(u[p .. 'u']) end
  return 0
end

-- The spend the key's limit counts (its period's, else all time's) and when it resets (ms,
-- 0 = never); `u`, the key's spend when the caller has read it already.
local function key_period_spend(kid, s, now, u)
  u = u or key_spend(kid)
  if not s.reset then return num(u.t), 0 end
  local every = RESETS[s.reset]
  local _, _, ends = period(every, now)
  return spent_in(u, every, now), ends
end

-- What the key may still reserve under its limit (nil: no limit; below 0 when an upstream
-- ran past its cap), with the spend the limit counts, the key's open reservations and
-- when the limit resets: admission refuses by it and keyinfo shows it, one reckoning.
local function key_room(kid, s, now, u)
  local spent, resets = key_period_spend(kid, s, now, u)
  local held = key_reserved(kid)
  return s.limit and tonumber(s.limit) - spent - held or nil, spent, held, resets
end

-- A charge (negative: money given back) counted in the key's spend at `now`. Money given
-- back for a charge counted at `counted_at` (ms) leaves a period that began since then
-- alone: that charge counted in a period now over.
local function key_charged(kid, amount, now, counted_at)
  if type(kid) ~= 'string' or amount == 0 then return end
  local u = key_spend(kid)
  u.t = fmt(num(u.t) + amount)
  -- Spend written today names this week's and this month's periods already (they are runs
  -- of whole days, and this is the only writer): the calendar is worked out only for a new day.
  local today = period('day', now)
  local same_day = u.d == today
  for _, every in ipairs(SPEND_PERIODS) do
    local p = string.sub(every, 1, 1)
    local id = (p == 'd' and today) or (same_day and u[p]) or period(every, now)
    if amount > 0 or not counted_at or period(every, counted_at) == id then
      u[p .. 'u'] = fmt((u[p] == id and num(u[p .. 'u']) or 0) + amount)
      u[p] = id
    end
  end
  redis.call('HSET', K.kuse, 'u:' .. kid, cjson.encode(u))
end

-- An open reservation closed (settled or reaped): its amount leaves the key's reserved.
local function key_release(r)
  if r.kr and r.key then redis.call('HINCRBY', K.kuse, 'r:' .. r.key, fmt(-tonumber(r.amount))) end
end
