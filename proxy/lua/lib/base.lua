-- base.lua: the keys, the context and the small helpers every script uses.
--
-- Units: money is integer micro-USD (1e-6 USD), times are integer milliseconds of
-- Redis TIME. Lua numbers are doubles, exact below 2^53: money is written back with
-- fmt() (never tostring, which prints 1e+15) and kept as strings inside JSON.
--
-- Each script names the KEYS it takes in its header (`-- keys: acct grants ...`), all in
-- the account's hash slot ({account id}); scripts.py prepends `K`, by those names, and a
-- name a script did not declare is an error, not a nil key:
--   acct    hash   account fields (balance, reserved, debt, carry, lifetime_*, plan, ...)
--   grants  hash   grant id -> grant JSON (every grant ever made)
--   live    set    ids of pending/active/expiring grants
--   resv    hash   request id -> open reservation JSON
--   ledger  stream append-only entries, field "e" = entry JSON
--   outbox  list   webhook events not yet delivered
--   keys    hash   api key id -> "active" | "revoked"
--   reaped  hash   request id -> reservation JSON closed by the reaper
--   idem    hash   grant idempotency key -> grant id
--   rl      hash   rate window of the account, fields r:<sec> / t:<sec>
--   rlm     hash   rate window of the account for one model
--   kset    hash   api key id -> its settings JSON (lib/keys.lua)
--   kuse    hash   api keys' reservations and spend (lib/keys.lua)
--   +rlk    hash   rate window of one api key with limits of its own
--   +done   string a settled request's marker (a key the caller adds for the call)
-- ARGV[1] is the context JSON built once per config (scripts.py: context), ARGV[2] a
-- clock offset in ms (0 in production, moved forward by tests). The state of one call
-- (these, K and the account's cache) is set by begin_call (lib/call.lua) before the
-- script's body runs: loaded once as a Redis function library, this code outlives a call.
local CTX, CLOCK_OFFSET = nil, 0
-- tiers and plans arrive as JSON strings inside the context: most calls need neither,
-- and decoding them into tables is most of the cost of a context
local TIERS, PLANS = nil, nil
local function tiers()
  TIERS = TIERS or CTX.decoded_tiers or cjson.decode(CTX.tiers)
  CTX.decoded_tiers = TIERS  -- kept with a context later calls reuse (lib/call.lua)
  return TIERS
end
local function plans()
  PLANS = PLANS or CTX.decoded_plans or cjson.decode(CTX.plans)
  CTX.decoded_plans = PLANS
  return PLANS
end
local UNLIMITED = nil  -- CTX.unlimited, micro-USD: "no limit", still exact in a double
local DAY_MS = 86400000

local function fmt(n) return string.format('%d', n) end

local function num(v)
  if v == false or v == nil or v == '' then return 0 end
  return tonumber(v)
end

-- CLOCK_OFFSET (ARGV[2]) is a clock offset in ms: 0 in production, moved forward by tests.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + CLOCK_OFFSET
end
