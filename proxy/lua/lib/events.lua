-- events.lua: balance events (low balance, depleted, auto top-up), fired once per crossing.

local function thresholds()
  local own = acct_get('thresholds')
  if own and own ~= '' then return cjson.decode(own) end
  return CTX.thresholds or {}
end

-- Balance events, state-based so each fires once per crossing and re-arms itself.
-- `silent` records the state without raising events: an account that starts at zero has
-- not crossed anything.
--
-- A low-balance threshold fires only when the balance crossed it since the last check
-- (`checked_balance`, kept by this function): one set (on the account or in the config)
-- above a balance that is already lower, or on an unfunded account, is armed silently,
-- the way a card's low-balance alert does not fire the moment it is switched on.
-- An auto top-up asks for money whenever the balance is below its threshold, but only
-- for an account that has had credit before (a grant of any kind): the billing system
-- charges a customer it has funded, not one that never bought anything (OpenAI, too,
-- lets auto-recharge follow a first purchase).
local function balance_events(now, silent)
  if not CTX.webhooks then return end
  local function raise(kind, data)
    if not silent then emit(kind, data, now) end
  end
  local balance = acct_num('balance')
  local before = tonumber(acct_get('checked_balance') or '') or balance
  local avail = balance - acct_num('reserved') - acct_num('held') + overage_room()
  for _, t in ipairs(thresholds()) do
    local flag = 'low_fired:' .. fmt(t)
    local fired = (acct_get(flag) ~= nil)
    if balance < t and not fired then
      acct_set(flag, '1')
      if before >= t then raise('credit_balance.low', {threshold_usd = fmt(t), balance_usd = fmt(balance)}) end
    elseif balance > t and fired then  -- re-armed once the balance rises above it
      acct_del(flag)
    end
  end
  if before ~= balance or acct_get('checked_balance') == nil then acct_set('checked_balance', fmt(balance)) end
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
      and now - last < math.max(CTX.topup_cooldown_ms or 0, 3600000)
    local cooled = last == 0 or now - last >= (CTX.topup_cooldown_ms or 0)
    if balance < tonumber(cfg.threshold) and not outstanding and cooled and redis.call('HLEN', K.grants) > 0 then
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
