-- generation.lua: one metered request of the account, as Redis knows it (reads only, so
-- one atomic snapshot: a request settling meanwhile is seen before or after, never lost).
-- Settled: the settled marker names its ledger entry (settle.lua). Running: its open
-- reservation. Closed by the reaper and not settled since: the reservation as reaped.
-- ARGV (after ctx, clock offset): 3 request id
-- keys: acct resv ledger reaped +done
-- reply settled: ledger_id entry
-- reply open: reservation
-- reply reaped: reservation
-- reply unknown:
-- reply no_account:
-- (entry, reservation: JSON as settle.lua and admit.lua/reap.lua wrote them)
local req_id = ARGV[3]
if redis.call('EXISTS', K.acct) == 0 then return reply({'no_account'}) end
local ledger_id = redis.call('GET', K.done)
if ledger_id then
  local rows = redis.call('XRANGE', K.ledger, ledger_id, ledger_id)
  if rows[1] then return reply({'settled', ledger_id, rows[1][2][2]}) end
end
local open = redis.call('HGET', K.resv, req_id)
if open then return reply({'open', open}) end
local reaped = redis.call('HGET', K.reaped, req_id)
if reaped then return reply({'reaped', reaped}) end
return reply({'unknown'})
