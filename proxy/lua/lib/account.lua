-- account.lua: the account hash (read once, written through these helpers), the
-- ledger stream and the webhook outbox.

-- The account hash, read once per script (one HGETALL instead of a HGET per field) and
-- kept in step with every write, which all go through the helpers below.
local A = nil
local function acct()
  if A == nil then
    A = {}
    local flat = redis.call('HGETALL', K.acct)
    for i = 1, #flat, 2 do A[flat[i]] = flat[i + 1] end
  end
  return A
end
local function acct_get(field) return acct()[field] end  -- nil when absent
local function acct_num(field) return num(acct()[field]) end
local function acct_set(field, value)
  redis.call('HSET', K.acct, field, value)
  acct()[field] = tostring(value)
end
local function acct_del(field)
  redis.call('HDEL', K.acct, field)
  acct()[field] = nil
end
local function acct_incr(field, delta)
  local value = redis.call('HINCRBY', K.acct, field, delta)
  acct()[field] = fmt(value)
  return value
end

-- Append one ledger entry and move the stored balance by its amount, together:
-- balance == sum(ledger amounts) holds after every script. `members`: more of the
-- entry, a JSON object none of whose names `entry` has, spliced in as it is (the
-- proxy's part of a settlement's entry: decoding it only to encode it again was ~1% of
-- a metered request's Redis CPU, more for a large usage object).
local function ledger_add(entry, now, members)
  local balance = acct_incr('balance', fmt(entry.amount))
  entry.amount = fmt(entry.amount)
  entry.balance = fmt(balance)
  entry.ts = now
  local json = cjson.encode(entry)
  if members and members ~= '{}' then json = string.sub(json, 1, -2) .. ',' .. string.sub(members, 2) end
  local id = redis.call('XADD', K.ledger, '*', 'e', json)
  return id, balance
end

local ACCOUNT_ID = nil  -- the hash tag of K.acct (begin_call)
local EMITTED = 0  -- events raised by this call: the caller then asks for a delivery visit

local function emit(kind, data, now)
  if not CTX.webhooks then return end
  local seq = acct_incr('event_seq', 1)
  data.account_id = ACCOUNT_ID
  local id = 'evt_' .. ACCOUNT_ID .. '_' .. fmt(seq)
  redis.call('RPUSH', K.outbox, cjson.encode({id = id, type = kind, ts = now, data = data, tries = 0}))
  EMITTED = EMITTED + 1
end

-- Every reply ends with the number of events raised, so the caller can wake the worker.
local function reply(t)
  t[#t + 1] = EMITTED
  return t
end
