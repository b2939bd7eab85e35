-- account.lua: create or update an account's settings (not its money).
-- ARGV (after ctx, clock offset): 3 'create' | 'update',
-- 4 JSON of fields to set (string values; '' deletes the field), 5 a token unique to
-- this create call (a retry of it returns the account it made, not 'exists').
-- keys: acct grants live resv ledger outbox
-- reply ok: fields
-- reply exists:
-- reply no_account:
-- reply invalid: field
local op, fields = ARGV[3], cjson.decode(ARGV[4])
-- settings only: money fields (balance, reserved, debt, lifetime_*, ...) move only
-- through the ledger scripts
local SETTINGS = {plan = true, status = true, overage_limit = true, auto_topup = true, rl_rpm = true,
                  rl_tpm = true, metadata = true, thresholds = true, id = true}
for field, _ in pairs(fields) do
  if not SETTINGS[field] then return reply({'invalid', field}) end
end
local exists = next(acct()) ~= nil
if op == 'create' and exists then
  -- this very call retried after its reply was lost: it created the account
  if ARGV[5] ~= '' and acct_get('create_token') == ARGV[5] then return reply({'ok', redis.call('HGETALL', K.acct)}) end
  return reply({'exists'})
end
if op == 'update' and not exists then return reply({'no_account'}) end
local now = now_ms()
-- A plan change ends the old plan's allocation: its remainder is voided, so switching
-- plans back and forth can never stack allocations within a period.
local plan_changed = fields.plan ~= nil and fields.plan ~= (acct_get('plan') or '')
if op == 'update' and plan_changed then
  refresh(now)
  for _, gid in ipairs(redis.call('SMEMBERS', K.live)) do
    local g = get_grant(gid)
    if string.sub(gid, 1, 6) == 'alloc_' then void_grant(g, now, 'plan changed') end
  end
  recompute_next_change(now)
end
if op == 'create' then
  redis.call('HSET', K.acct, 'created_ms', fmt(now), 'status', 'active', 'balance', '0',
             'reserved', '0', 'debt', '0', 'held', '0', 'lifetime_paid', '0',
             'lifetime_consumed', '0', 'create_token', ARGV[5])
end
for field, value in pairs(fields) do
  if value == '' then redis.call('HDEL', K.acct, field) else redis.call('HSET', K.acct, field, value) end
end
A = nil  -- written directly above: read afresh
refresh(now)
derive_tier(now)
balance_events(now, op == 'create')
return reply({'ok', redis.call('HGETALL', K.acct)})
