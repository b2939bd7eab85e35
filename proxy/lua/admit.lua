-- admit.lua: the ONE admission script of a metered request.
-- Checks the key (status, expiry, models) and account, runs lazy grant bookkeeping,
-- derives the tier, checks RPM/TPM in a rolling minute (1 s buckets; the key's own
-- limits in a window of its own; lib/windows.lua) and reserves the worst-case cost against the balance
-- and the key's spend limit (lib/keys.lua).
-- ARGV (after ctx, clock offset):
--   3 request id   4 key id   5 model   6 prompt cost (micro-USD, rounded up)
--   7 output cost at max tokens (micro-USD, rounded up)
--   8 output price per token in pico-USD (clamp mode; 0 = cannot clamp)
--   9 prompt tokens (estimate)   10 max output tokens (all choices)   11 choices (n)
--   last, after them all: the reaper's visit time (ms) for `+watch` (the last KEY), written
--   with the reservation; only a caller on one Redis passes both (runner.LeanRunner: on a
--   Cluster the watch shard is in another slot, and the caller writes the pointer itself)
-- keys: acct grants live resv ledger outbox keys rl rlm kset kuse +rlk +watch
-- Replies (scripts.py decodes them by these names; every reply ends with `events`):
-- reply ok: reserved balance available tier rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms clamp downgrade_to
-- reply insufficient: available needed tier rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply rate_requests: tier limit used requested retry_ms rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply rate_tokens: tier limit used requested retry_ms rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply key_rate_requests: tier limit used requested retry_ms rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply key_rate_tokens: tier limit used requested retry_ms rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply key_limit: limit spent reserved needed reset resets_at rpm rpm_left rpm_reset_ms tpm tpm_left tpm_reset_ms
-- reply no_account:
-- reply revoked:
-- reply expired: expires_at
-- reply model_not_allowed:
-- reply suspended:
-- reply replayed:
-- (clamp: the lowered max tokens, 0 = unchanged; downgrade_to: '' = served as asked;
-- replayed: this request id is reserved already, by an attempt whose reply was lost;
-- key_limit: the key's limit and its spend and reservations in the period of `reset`
-- ('' = all time) ending at resets_at (ms, 0 = never))
local req_id, key_id, model = ARGV[3], ARGV[4], ARGV[5]
local prompt_cost, output_cost, out_pico = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local prompt_tokens, max_out, n = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])

if next(acct()) == nil then return reply({'no_account'}) end
-- a call retried after its reply was lost: the first one reserved already
if redis.call('HEXISTS', K.resv, req_id) == 1 then return reply({'replayed'}) end
local now = now_ms()
local key = key_settings(key_id)
local refusal = key_refusal(key_id, key, now)
if refusal == 'revoked' then return reply({'revoked'}) end
if refusal then return reply({'expired', key.exp}) end
if acct_get('status') == 'suspended' then return reply({'suspended'}) end
if not key_allows(key, model) then return reply({'model_not_allowed'}) end

local now_s = math.floor(now / 1000)
if refresh(now) then balance_events(now) end  -- e.g. credit expired: the billing system hears of it
local tier, rpm, tpm, model_rpm, model_tpm = derive_tier(now)

-- Milliseconds until enough of the window ages out for `requested` more to fit.
-- (Only rejections need the buckets in order: read here, not on every admission.)
local function retry_ms(w, kind, used, limit, requested)
  local freed = 0
  for _, b in ipairs(window_buckets(w, kind)) do
    freed = freed + b[2]
    if used - freed + requested <= limit then return (b[1] + 60) * 1000 - now end
  end
  return 60000
end

-- When capacity next grows: the oldest counted second leaves the window (this
-- request's own second when it is the only one counted).
local function reset_ms(w, admitted)
  if w.o then return (w.o + 60) * 1000 - now end
  if admitted > 0 then return (now_s + 60) * 1000 - now end
  return 0
end

local tokens = prompt_tokens + max_out
local used = open_window(K.rl, now_s)
local per_key = key.rpm ~= nil or key.tpm ~= nil  -- the key's own limits, below the account's
local kused = {r = 0, t = 0}
if per_key then kused = open_window(K.rlk, now_s) end

-- The headers' figures: the account's, or the key's where they bind tighter.
local function figures(admitted_tokens, admitted_requests)
  local out = {rpm, math.max(0, rpm - used.r - admitted_requests), reset_ms(used, admitted_requests),
               tpm, math.max(0, tpm - used.t - admitted_tokens), reset_ms(used, admitted_tokens)}
  if key.rpm and key.rpm - kused.r - admitted_requests < out[2] then
    out[1], out[2] = key.rpm, math.max(0, key.rpm - kused.r - admitted_requests)
    out[3] = reset_ms(kused, admitted_requests)
  end
  if key.tpm and key.tpm - kused.t - admitted_tokens < out[5] then
    out[4], out[5] = key.tpm, math.max(0, key.tpm - kused.t - admitted_tokens)
    out[6] = reset_ms(kused, admitted_tokens)
  end
  return out
end

local function reject(code, limit, w, kind, requested)
  local out = {code, tier, limit, w[kind], requested, retry_ms(w, kind, w[kind], limit, requested)}
  for _, v in ipairs(figures(0, 0)) do out[#out + 1] = v end
  return reply(out)
end

if used.r + 1 > rpm then return reject('rate_requests', rpm, used, 'r', 1) end
if used.t + tokens > tpm then return reject('rate_tokens', tpm, used, 't', tokens) end
local per_model = model_rpm > 0 or model_tpm > 0
local mused = nil
if per_model then
  mused = open_window(K.rlm, now_s)
  if model_rpm > 0 and mused.r + 1 > model_rpm then return reject('rate_requests', model_rpm, mused, 'r', 1) end
  if model_tpm > 0 and mused.t + tokens > model_tpm then
    return reject('rate_tokens', model_tpm, mused, 't', tokens)
  end
end
if key.rpm and kused.r + 1 > key.rpm then return reject('key_rate_requests', key.rpm, kused, 'r', 1) end
if key.tpm and kused.t + tokens > key.tpm then return reject('key_rate_tokens', key.tpm, kused, 't', tokens) end

local avail = available()
local reserve = prompt_cost + output_cost
-- A key with a limit reserves at most the room its period has left: the budget is the
-- tighter of that and the account's available balance.
local key_spent, key_held, key_resets, budget = 0, 0, 0, avail
if key.limit then
  local room
  room, key_spent, key_held, key_resets = key_room(key_id, key, now)
  budget = math.min(avail, room)
end
local clamp, downgrade = 0, ''
if reserve > budget then
  local per_choice = out_pico * n
  local affordable = 0
  if CTX.mode == 'clamp' and per_choice > 0 and budget > prompt_cost then
    affordable = math.floor((budget - prompt_cost) * 1000000 / per_choice)
    if affordable * n >= max_out then affordable = math.floor(max_out / n) - 1 end
    -- doubles lose a little above 2^53 / 1e6: step down until it really fits
    while affordable > 0 and prompt_cost + math.ceil(affordable * per_choice / 1000000) > budget do
      affordable = affordable - 1
    end
  end
  local plan = plan_of_account()
  if affordable >= 1 then
    clamp = affordable
    reserve = prompt_cost + math.ceil(affordable * per_choice / 1000000)
    tokens = prompt_tokens + affordable * n
  elseif plan and plan.downgrade_to and plan.downgrade_to ~= '' and plan.downgrade_to ~= model
         and avail < prompt_cost  -- exhausted: not even the prompt fits (a big ask alone is a 402)
         and key_allows(key, plan.downgrade_to) then  -- never a model the key may not use
    downgrade = plan.downgrade_to
    reserve = 0
  elseif budget < avail then  -- the key's limit refuses it, not the balance
    local out = {'key_limit', key.limit, key_spent, key_held, reserve, key.reset or '', key_resets}
    for _, v in ipairs(figures(0, 0)) do out[#out + 1] = v end
    return reply(out)
  else
    local out = {'insufficient', avail, reserve, tier}
    for _, v in ipairs(figures(0, 0)) do out[#out + 1] = v end
    return reply(out)
  end
end

count_admission(used, now_s, tokens)
if mused then count_admission(mused, now_s, tokens) end
if per_key then count_admission(kused, now_s, tokens) end
redis.call('HSET', K.resv, req_id, cjson.encode({
  amount = fmt(reserve), admitted = now, sec = now_s, tokens = tokens, pm = per_model, pk = per_key,
  key = key_id, model = model, exp = now + CTX.ttl_ms, dg = downgrade, kr = reserve > 0}))
if rawget(K, 'watch') then redis.call('ZADD', K.watch, 'LT', ARGV[#ARGV], ACCOUNT_ID) end  -- never unseen by the reaper
acct_incr('reserved', fmt(reserve))
if reserve > 0 then redis.call('HINCRBY', K.kuse, 'r:' .. key_id, fmt(reserve)) end
local out = {'ok', reserve, acct_num('balance'), avail - reserve, tier}
for _, v in ipairs(figures(tokens, 1)) do out[#out + 1] = v end
out[#out + 1] = clamp
out[#out + 1] = downgrade
return reply(out)
