-- windows.lua: the rolling-minute rate windows (RPM/TPM) as running sums.
--
-- A window (rl, rlm, rlk) is a hash of 1 s buckets, 'r:' .. sec (requests) and
-- 't:' .. sec (tokens), and beside them
--   R:0, T:0  the sums of every bucket in the hash
--   P:0       the last second pruned: no bucket at or before it is left
--   O:0       the oldest second with a bucket (-1: none)
-- (named as buckets of second 0, so that a release before the sums, scanning every
-- field during a rolling upgrade, drops them as long gone instead of failing on them)
-- An admission reads the sums instead of scanning the buckets, and drops only the
-- seconds that left the minute since the last prune (none or one when busy), so its
-- cost stays flat however full the minute is. The sums stay exact: every bucket
-- written, corrected or dropped moves its sum by the same amount. A hash without `P:0`
-- (new, expired, or written by a release before the sums), a clock that went back past
-- the last prune, and every window once a minute are rebuilt by one scan, which counts
-- what the old scan counted: whatever wrote buckets without their sums (an older
-- release's settlement, during an upgrade) is counted exactly again within a minute.

local WINDOW_S = 60
-- `H:0`, written with the sums: a value longer than Redis's hash-max-listpack-value (64
-- bytes by default) keeps the hash a hashtable (~4 KB more when full: docs/scaling.md).
-- As a listpack (~120 fields) every field the admission reads or adds was found by a
-- scan of the whole hash: ~5% of a metered request's Redis instructions per window.
-- (Ignored by the scans, like the sums.)
local HASHTABLE = 'keeps this rate window a hashtable: field lookups in O(1), not a scan of ~120'

-- The sums as they now stand, for the next call (a refused admission prunes too).
local function save_sums(w)
  redis.call('HSET', w.key, 'R:0', fmt(w.r), 'T:0', fmt(w.t), 'P:0', fmt(w.p), 'O:0', fmt(w.o or -1), 'H:0', HASHTABLE)
  return w
end

-- Every bucket still in the minute (after `lo`), dropping the rest: the sums from scratch.
local function rebuild_window(key, now_s, lo)
  local flat = redis.call('HGETALL', key)
  local w = {key = key, r = 0, t = 0, p = lo, o = nil}
  local stale = {}
  for i = 1, #flat, 2 do
    local kind, sec = string.sub(flat[i], 1, 1), tonumber(string.sub(flat[i], 3))
    if (kind == 'r' or kind == 't') and string.sub(flat[i], 2, 2) == ':' and sec then
      if sec <= lo then
        stale[#stale + 1] = flat[i]
      else
        local n = tonumber(flat[i + 1])
        w[kind] = w[kind] + n
        if w.o == nil or sec < w.o then w.o = sec end
        if sec == now_s then w['n' .. kind] = n end
      end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if #flat > 0 then save_sums(w) end
  return w
end

-- The oldest second after `lo` (up to now_s) with a bucket; nil when none is left,
-- false when some are but only later than now_s (a clock that went back).
local function oldest_after(key, lo, now_s, requests)
  if requests == 0 then return nil end  -- every bucket counts one request at least
  if redis.call('HEXISTS', key, 'r:' .. fmt(lo + 1)) == 1 then return lo + 1 end  -- a busy minute
  local fields = {}
  for sec = lo + 2, now_s do fields[#fields + 1] = 'r:' .. fmt(sec) end
  if #fields == 0 then return false end
  for i, v in ipairs(redis.call('HMGET', key, unpack(fields))) do
    if v then return lo + 1 + i end
  end
  return false
end

-- The window `key` at now_s: {r, t} its sums (this minute's requests and tokens), `o`
-- its oldest second, {nr, nt} the bucket of now_s (nil: none yet); what left the minute
-- is dropped (its sums move with it).
local function open_window(key, now_s)
  local lo = now_s - WINDOW_S
  local sec = fmt(now_s)
  local m = redis.call('HMGET', key, 'R:0', 'T:0', 'P:0', 'O:0', 'r:' .. sec, 't:' .. sec)
  local p = tonumber(m[3])
  if p == nil or lo - p > WINDOW_S or now_s <= p or math.floor(lo / WINDOW_S) ~= math.floor(p / WINDOW_S) then
    return rebuild_window(key, now_s, lo)  -- (the last: once a minute)
  end
  local o = tonumber(m[4])
  local w = {key = key, r = tonumber(m[1]), t = tonumber(m[2]), p = p, o = o >= 0 and o or nil,
             nr = tonumber(m[5]), nt = tonumber(m[6])}  -- (tonumber(false): nil, no bucket yet)
  if lo <= p then return w end
  w.p = lo
  if w.o == nil or w.o > lo then return save_sums(w) end
  local fields = {}
  for sec = w.o, lo do
    fields[#fields + 1] = 'r:' .. fmt(sec)
    fields[#fields + 1] = 't:' .. fmt(sec)
  end
  local gone = {}
  for i, v in ipairs(redis.call('HMGET', key, unpack(fields))) do
    if v then
      local kind = string.sub(fields[i], 1, 1)
      w[kind] = w[kind] - tonumber(v)
      gone[#gone + 1] = fields[i]
    end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  local oldest = oldest_after(key, lo, now_s, w.r)
  if oldest == false then return rebuild_window(key, now_s, lo) end
  w.o = oldest
  return save_sums(w)
end

-- One admission counted in the window at now_s: a request and its tokens, written with
-- the sums in one HSET (open_window read the bucket). The hash lives a minute past its
-- newest second: its expiry is set with each second's first request (a bucket is
-- written only here). (`P:0` is stored as it stands: open_window saved any prune; `O:0`
-- moves only for a first or an earlier second.)
local function count_admission(w, now_s, tokens)
  local sec = fmt(now_s)
  local r, t = 'r:' .. sec, 't:' .. sec
  local nr, nt = fmt((w.nr or 0) + 1), fmt((w.nt or 0) + tokens)
  if w.o == nil or now_s < w.o then
    redis.call('HSET', w.key, r, nr, t, nt, 'R:0', fmt(w.r + 1), 'T:0', fmt(w.t + tokens), 'P:0', fmt(w.p),
               'O:0', sec, 'H:0', HASHTABLE)
  else
    redis.call('HSET', w.key, r, nr, t, nt, 'R:0', fmt(w.r + 1), 'T:0', fmt(w.t + tokens))
  end
  if w.nr == nil then redis.call('PEXPIRE', w.key, (WINDOW_S + 1) * 1000) end
end

-- The window's buckets of one kind ({sec, value}), oldest first: what a refusal needs
-- to say when enough of the minute ages out.
local function window_buckets(w, kind)
  local flat = redis.call('HGETALL', w.key)
  local out = {}
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == kind .. ':' then
      local sec = tonumber(string.sub(flat[i], 3))
      if sec > w.p then out[#out + 1] = {sec, tonumber(flat[i + 1])} end
    end
  end
  table.sort(out, function(a, b) return a[1] < b[1] end)
  return out
end

-- A request's tokens in the bucket of its admission second corrected by `delta` (the
-- real count minus the worst case admitted), never below 0, when that bucket is still
-- counted.
local function correct_tokens(key, sec, delta)
  local field = 't:' .. fmt(sec)
  local m = redis.call('HMGET', key, 'P:0', 'T:0', field)
  local p = tonumber(m[1])
  if p == nil or sec <= p or not m[3] then return end
  local value = tonumber(m[3]) + delta
  local moved = delta
  if value < 0 then moved, value = delta - value, 0 end
  redis.call('HSET', key, field, fmt(value), 'T:0', fmt(tonumber(m[2]) + moved))
end
