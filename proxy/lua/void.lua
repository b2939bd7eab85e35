-- void.lua: void (refund) a grant's remainder; voiding twice is a no-op.
-- ARGV (after ctx, clock offset): 3 grant id, 4 reason.
-- keys: acct grants live resv ledger outbox
-- reply voided: grant
-- reply noop: grant
-- reply not_found:
local gid, reason = ARGV[3], ARGV[4]
if not redis.call('HGET', K.grants, gid) then return reply({'not_found'}) end
local now = now_ms()
refresh(now)
local g = get_grant(gid)
if g.status == 'voided' or g.status == 'expired' or g.status == 'depleted' then
  return reply({'noop', cjson.encode(g)})
end
void_grant(g, now, reason)
recompute_next_change(now)
balance_events(now)
return reply({'voided', cjson.encode(g)})
