-- call.lua: the start of every call. The library above may be loaded once (a Redis
-- function library) and serve many calls: what one call sees is set here, from its own
-- KEYS (as `K`, by the script's `-- keys:` names) and ARGV, before its body runs.

-- Contexts decoded by earlier calls of a loaded library, by their JSON (one per config
-- and model): scripts only read CTX (tiers() and plans() keep their decoded tables in
-- it), so a call may reuse it. Bounded: a config reload leaves the old ones behind.
local CONTEXTS, CONTEXT_COUNT = {}, 0
-- K's metatable: a name the script did not declare is an error, never a nil key.
local UNDECLARED = {__index = function(_, name) error('this script did not declare KEYS `' .. name .. '`') end}

local function begin_call(keys, argv)
  K = keys
  local known = CONTEXTS[argv[1]]
  if known == nil then
    if CONTEXT_COUNT >= 64 then CONTEXTS, CONTEXT_COUNT = {}, 0 end
    known = cjson.decode(argv[1])
    CONTEXTS[argv[1]], CONTEXT_COUNT = known, CONTEXT_COUNT + 1
  end
  CTX, CLOCK_OFFSET = known, tonumber(argv[2])
  TIERS, PLANS, UNLIMITED = nil, nil, CTX.unlimited
  A, ACCOUNT_ID, EMITTED = nil, string.match(K.acct, '{(.-)}'), 0
end
