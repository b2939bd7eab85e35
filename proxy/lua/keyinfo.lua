-- keyinfo.lua: API keys as `GET /v1/key` and the admin API show them: status, settings,
-- reservations and spend (all time, and the current UTC day, week and month), from the
-- counters settlement keeps (lib/keys.lua), so a read never scans the ledger.
-- ARGV (after ctx, clock offset): 3.. key ids.
-- keys: acct keys kset kuse
-- reply: keys
-- (keys: one JSON object per key id: {id, status ('' = no such key), settings (JSON
-- text), reserved, total, day, week, month, limit_spent (what the limit counts), room
-- (what may still be reserved under the limit, '' = no limit) (micro-USD), resets_at
-- (ms of the end of the limit's period, 0 = never), expired})
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local kid = ARGV[i]
  local raw = redis.call('HGET', K.kset, kid) or '{}'
  local s, u = cjson.decode(raw), key_spend(kid)
  local room, spent, held, resets = key_room(kid, s, now, u)
  local view = {id = kid, status = redis.call('HGET', K.keys, kid) or '', settings = raw,
                reserved = fmt(held), total = fmt(num(u.t)), limit_spent = fmt(spent),
                room = room and fmt(room) or '', resets_at = fmt(resets),
                expired = s.exp ~= nil and tonumber(s.exp) <= now}
  for _, every in ipairs(SPEND_PERIODS) do view[every] = fmt(spent_in(u, every, now)) end
  out[#out + 1] = cjson.encode(view)
end
return reply({out})
