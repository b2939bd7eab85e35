-- settle.lua: the ONE settlement script of a metered request; idempotent by request id.
-- Releases the reservation, charges the exact cost (lib/charges.lua charge: half-up with the
-- account's carried remainder, drawn from the grants live at admission, the rest
-- becoming overage debt), appends the usage entry, marks the request settled, updates
-- lifetime figures and the API key's spend (its reservation released, the charge counted:
-- lib/keys.lua), corrects the TPM windows to real tokens and raises balance events.
-- A reservation the reaper released is still charged: in full, or the difference to
-- what the reaper charged from the request's last checkpoint. A reservation Redis does
-- not know (lost in a failover) is charged too, flagged `unreserved`. Only a request
-- marked settled is a duplicate.
-- ARGV (after ctx, clock offset):
--   3 request id   4 exact cost, whole micro-USD   5 exact cost, fraction in fine units
--   (1e-15 micro-USD)   6 real tokens (input + output)   7 the proxy's members of the
--   entry, a JSON object spliced into it (model, usage, estimated, ...; none this script
--   writes: ledger.SETTLE_WRITES)   8 entry type ('' = usage; 'release' when nothing is
--   charged)   9 the API key id ('' = the reservation's)
-- keys: acct grants live resv ledger outbox reaped rl rlm kuse +done +rlk
-- Replies (scripts.py decodes them by these names; every reply ends with `events`):
-- reply ok: charged balance ledger_id reserved
-- reply duplicate: ledger_id
-- (reserved: the reservation it closed, -1 when Redis knew none)
local req_id, whole, fine, real_tokens = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local members = ARGV[7]
local entry = {type = ARGV[8] ~= '' and ARGV[8] or 'usage', key_id = ARGV[9] ~= '' and ARGV[9] or nil}
local marker = K.done  -- the request's settled marker (string: its ledger entry id)

local done = redis.call('GET', marker)
if done then return reply({'duplicate', done}) end

local now = now_ms()
local raw = redis.call('HGET', K.resv, req_id)
local r, earlier_draws = nil, nil
if raw then
  redis.call('HDEL', K.resv, req_id)
  r = cjson.decode(raw)
  acct_incr('reserved', fmt(-tonumber(r.amount)))
  key_release(r)
else
  -- released by the reaper (its proxy was presumed dead): charge what it has not yet
  raw = redis.call('HGET', K.reaped, req_id)
  if raw then
    redis.call('HDEL', K.reaped, req_id)
    r = cjson.decode(raw)
    if r.charged then
      whole, fine = whole - tonumber(r.cw), fine - tonumber(r.cf)
      if fine < 0 then whole, fine = whole - 1, fine + CTX.fine end
      entry.previously_charged = r.charged
      earlier_draws = r.draws
    end
  end
end

entry.request_id = req_id
entry.key_id = entry.key_id or (r and r.key)  -- whose spend it counts in
if r then
  entry.reserved = r.amount
  entry.admitted = r.admitted  -- when the request began (ms): its generation's created_at
else
  entry.unreserved = true
end
-- a charge above its reservation (an upstream that ignored its cap) is flagged
local limit = (r and not r.charged) and tonumber(r.amount) or nil
local charged, id, balance = charge(whole, fine, r and r.admitted or now, entry, now, earlier_draws, limit, r and r.rt,
                                    members)
redis.call('SET', marker, id, 'PX', CTX.settled_ttl_ms)

-- TPM counted the worst case at admission; correct its bucket to the real tokens.
local now_s = math.floor(now / 1000)
if r and r.sec > now_s - 60 then
  local delta = real_tokens - r.tokens
  if delta ~= 0 then
    correct_tokens(K.rl, r.sec, delta)
    if r.pm then correct_tokens(K.rlm, r.sec, delta) end
    if r.pk then correct_tokens(K.rlk, r.sec, delta) end
  end
end

recheck_held(now)
refresh(now)
-- One event per `invoice_every` of overage incurred (a single large request can cross
-- several); repaid debt never makes the same dollars invoiceable twice.
local plan = plan_of_account()
if plan and plan.invoice_every and plan.invoice_every > 0 then
  local steps = math.floor(acct_num('overage_total') / plan.invoice_every)
  for step = acct_num('invoiced_steps') + 1, steps do
    emit('overage.invoice_threshold', {amount_usd = fmt(plan.invoice_every), invoiced_through_usd = fmt(step * plan.invoice_every),
                                       overage_usd = fmt(acct_num('debt')), invoice_every_usd = fmt(plan.invoice_every)}, now)
  end
  if steps > acct_num('invoiced_steps') then acct_set('invoiced_steps', steps) end
end
balance_events(now)
return reply({'ok', charged, balance, id, r and tonumber(r.amount) or -1})
