-- calendar.lua: UTC calendar periods (days, ISO weeks, months, years).

-- Calendar periods in UTC, computed from Redis time (no os.date in Redis Lua).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- Returns (period id, start ms, end ms) of the period containing now. (fmt: '%d', cheaper
-- than the '%.14g' of a number joined to a string, and the same for these integers)
local function period(every, now)
  local days = math.floor(now / DAY_MS)
  if every == 'day' then
    return 'd' .. fmt(days), days * DAY_MS, (days + 1) * DAY_MS
  elseif every == 'week' then  -- ISO weeks start on Monday; 1970-01-01 was a Thursday
    local start = days - (days + 3) % 7
    return 'w' .. fmt(start), start * DAY_MS, (start + 7) * DAY_MS
  end
  local y, m = civil_from_days(days)
  if every == 'year' then
    return 'y' .. fmt(y), days_from_civil(y, 1, 1) * DAY_MS, days_from_civil(y + 1, 1, 1) * DAY_MS
  end
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return 'm' .. fmt(y) .. '-' .. fmt(m), days_from_civil(y, m, 1) * DAY_MS, days_from_civil(ny, nm, 1) * DAY_MS
end
