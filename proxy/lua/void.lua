-- void.lua: void (refund) a grant's remainder; voiding twice is a no-op.
-- KEYS: see lib.lua.  ARGV (after ctx, clock offset): 3 grant id, 4 reason.
-- Returns {'voided'|'noop', grant JSON} or {'not_found'}.
local gid, reason = ARGV[3], ARGV[4]
if not redis.call('HGET', K.grants, gid) then return reply({'not_found'}) end
local now = now_ms()
refresh(now)
local g = get_grant(gid)
if g.status == 'voided' or g.status == 'expired' or g.status == 'depleted' then
  return reply({'noop', cjson.encode(g)})
end
local remaining = tonumber(g.remaining)
local was = g.status
if was == 'expiring' then acct_incr('held', fmt(-remaining)) end
g.status = 'voided'
g.voided = g.remaining
g.remaining = '0'
g.void_reason = reason
put_grant(g)
redis.call('SREM', K.live, gid)
-- a pending grant never entered the balance: its void moves nothing
local amount = (was == 'pending') and 0 or -remaining
ledger_add({type = 'void', amount = amount, grant_id = gid, description = reason}, now)
if g.kind == 'paid' and was ~= 'pending' then
  acct_incr('lifetime_paid', fmt(-remaining))
end
recompute_next_change(now)
balance_events(now)
return reply({'voided', cjson.encode(g)})
