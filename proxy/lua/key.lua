-- key.lua: change an API key's settings (lib/keys.lua `kset`) in one step: admission
-- reads them in the same slot, so a change applies to the next request on every
-- instance, and two changes of different fields never lose one another.
-- ARGV (after ctx, clock offset): 3 key id, 4 JSON object of settings to set,
-- 5 JSON array of the names of settings to clear.
-- keys: acct keys kset
-- reply ok: settings
-- reply no_key:
local kid = ARGV[3]
if not redis.call('HGET', K.keys, kid) then return reply({'no_key'}) end
local s = key_settings(kid)
for name, value in pairs(cjson.decode(ARGV[4])) do s[name] = value end
for _, name in ipairs(cjson.decode(ARGV[5])) do s[name] = nil end
local raw = next(s) == nil and '{}' or cjson.encode(s)
redis.call('HSET', K.kset, kid, raw)
return reply({'ok', raw})
