-- base.lua: the keys, the context and the small helpers every script uses.
--
-- Units: money is integer micro-USD (1e-6 USD), times are integer milliseconds of
-- Redis TIME. Lua numbers are doubles, exact below 2^53: money is written back with
-- fmt() (never tostring, which prints 1e+15) and kept as strings inside JSON.
--
-- Every script receives the same KEYS, all in one hash slot ({account id}):
--   1 acct    hash   account fields (balance, reserved, debt, carry, lifetime_*, plan, ...)
--   2 grants  hash   grant id -> grant JSON (every grant ever made)
--   3 live    set    ids of pending/active/expiring grants
--   4 resv    hash   request id -> open reservation JSON
--   5 ledger  stream append-only entries, field "e" = entry JSON
--   6 outbox  list   webhook events not yet delivered
--   7 keys    hash   api key id -> "active" | "revoked"
--   8 reaped  hash   request id -> reservation JSON closed by the reaper
--   9 idem    hash   grant idempotency key -> grant id
--  10 rl      hash   rate window of the account, fields r:<sec> / t:<sec>
--  11 rlm     hash   rate window of the account for one model
-- ARGV[1] is the context JSON built once per config (scripts.py: context), ARGV[2] a
-- clock offset in ms (0 in production, moved forward by tests).
local K = {acct = KEYS[1], grants = KEYS[2], live = KEYS[3], resv = KEYS[4],
           ledger = KEYS[5], outbox = KEYS[6], keys = KEYS[7], reaped = KEYS[8],
           idem = KEYS[9], rl = KEYS[10], rlm = KEYS[11]}
local CTX = cjson.decode(ARGV[1])
-- tiers and plans arrive as JSON strings inside the context: most calls need neither,
-- and decoding them into tables is most of the cost of a context
local TIERS, PLANS = nil, nil
local function tiers()
  TIERS = TIERS or cjson.decode(CTX.tiers)
  return TIERS
end
local function plans()
  PLANS = PLANS or cjson.decode(CTX.plans)
  return PLANS
end
local UNLIMITED = CTX.unlimited  -- micro-USD: "no limit", still exact in a double
local DAY_MS = 86400000

local function fmt(n) return string.format('%d', n) end

local function num(v)
  if v == false or v == nil or v == '' then return 0 end
  return tonumber(v)
end

-- ARGV[2] is a clock offset in ms: 0 in production, moved forward by tests.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end
