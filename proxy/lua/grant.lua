-- grant.lua: add a credit grant (paid or promotional), idempotent by idempotency key.
-- A grant effective now is activated at once (ledger `grant` entry, pays overage
-- debt first); a future one waits as `pending` and is activated lazily by refresh().
-- ARGV (after ctx, clock offset): 3 grant JSON {id, kind, amount
-- (micro-USD string), priority, effective_at (ms, 0 = now), expires_at (ms, 0 =
-- never), description, idem, cost_basis}.
-- keys: acct grants live resv ledger outbox idem
-- reply created: grant
-- reply exists: grant
-- reply no_account:
-- reply invalid: reason
local spec = cjson.decode(ARGV[3])
spec.priority = spec.priority or 0
spec.effective_at = spec.effective_at or 0
spec.expires_at = spec.expires_at or 0
if next(acct()) == nil then return reply({'no_account'}) end
if spec.idem then
  local existing = redis.call('HGET', K.idem, spec.idem)
  if existing then return reply({'exists', redis.call('HGET', K.grants, existing)}) end
end
-- grant ids are made fresh per call: an existing one is this call retried after a lost reply
local made = redis.call('HGET', K.grants, spec.id)
if made then return reply({'exists', made}) end
local now = now_ms()
refresh(now)
-- a back-dated effective_at is kept (migrated payments keep their history and tier
-- clock) and is active at once; a future one waits as pending
local effective = spec.effective_at > 0 and spec.effective_at or now
if spec.expires_at > 0 and (spec.expires_at <= effective or spec.expires_at <= now) then
  return reply({'invalid', 'expires_at must be later than effective_at and now'})
end
-- every amount stays exact in Lua's doubles: no balance may pass 2^53 micro-USD
if acct_num('balance') + tonumber(spec.amount) > CTX.max_exact then
  return reply({'invalid', 'this grant would take the balance past the largest exact amount'})
end
local g = grant_record(spec.id, spec.kind, tonumber(spec.amount), spec.priority, effective,
                       spec.expires_at, now, spec.description, spec.idem)
g.cost_basis = spec.cost_basis
if spec.idem then redis.call('HSET', K.idem, spec.idem, g.id) end
redis.call('SADD', K.live, g.id)
if effective <= now then activate(g, now, 'grant') else put_grant(g) end
recompute_next_change(now)
balance_events(now)
return reply({'created', redis.call('HGET', K.grants, g.id)})
