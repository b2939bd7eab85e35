-- call.lua: the start of every call. The library above may be loaded once (a Redis
-- function library) and serve many calls: what one call sees is set here, from its own
-- KEYS (as `K`, by the script's `-- keys:` names) and ARGV, before its body runs.

local function begin_call(keys, argv)
  K = keys
  CTX, CLOCK_OFFSET = cjson.decode(argv[1]), tonumber(argv[2])
  TIERS, PLANS, UNLIMITED = nil, nil, CTX.unlimited
  A, ACCOUNT_ID, EMITTED = nil, string.match(K.acct, '{(.-)}'), 0
end
