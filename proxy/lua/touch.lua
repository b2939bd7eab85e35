-- touch.lua: read an account's balance after lazy bookkeeping (due grants activated,
-- lapsed ones expired, plan allocation granted) and the tier derived.
-- ARGV: ctx, clock offset, 3 key id to check ('' = admin read).
-- keys: acct grants live resv ledger outbox keys kset
-- reply ok: fields grants rpm tpm overage_room
-- reply no_account:
-- reply revoked:
-- reply expired: expires_at
-- (fields: the flat account hash; grants: the live grants' JSON)
if next(acct()) == nil then return reply({'no_account'}) end
local now = now_ms()
if ARGV[3] ~= '' then
  local key = key_settings(ARGV[3])
  local refusal = key_refusal(ARGV[3], key, now)
  if refusal == 'revoked' then return reply({'revoked'}) end
  if refusal then return reply({'expired', key.exp}) end
end
refresh(now)
local _, rpm, tpm = derive_tier(now)
local grants = {}
for _, gid in ipairs(redis.call('SMEMBERS', K.live)) do
  grants[#grants + 1] = redis.call('HGET', K.grants, gid)
end
balance_events(now)
return reply({'ok', redis.call('HGETALL', K.acct), grants, rpm, tpm, overage_room()})
