-- plans.lua: the account's plan and how far below zero it may go.

local function plan_of_account()
  local name = acct_get('plan')
  if not name or name == '' then return nil end
  return plans()[name]
end

-- How far below zero the balance may go: the account's override, else its plan's.
local function overage_room()
  local override = acct_get('overage_limit')
  if override == 'unlimited' then return UNLIMITED end
  if override and override ~= '' then return tonumber(override) end
  local plan = plan_of_account()
  return plan and plan.overage or 0  -- CTX.unlimited when the plan's limit is null
end
