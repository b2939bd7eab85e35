-- tiers.lua: the account's rate tier from its lifetime figures.

-- The account's tier from its lifetime figures (tiers() ascending by min_usd), kept
-- in the account so a change is noticed once. Returns the tier and its limits, with
-- the account's admin override (rl_rpm / rl_tpm) taking precedence.
local function derive_tier(now)
  local basis = acct_num(CTX.basis == 'consumed' and 'lifetime_consumed' or 'lifetime_paid')
  local first = acct_num('first_payment_ms')
  local chosen = tiers()[1]
  for _, t in ipairs(tiers()) do
    if basis >= t.min and (t.days == 0 or (first > 0 and now - first >= t.days * DAY_MS)) then chosen = t end
  end
  -- While instances run different configs (a staggered reload), only the newest tier
  -- table (CTX.tier_generation, a generation handed out by Redis once per distinct table) may change
  -- the stored tier; older ones apply their limits without flipping it back and forth.
  local gen, stored_gen = CTX.tier_generation or 0, acct_num('tier_gen')
  if gen > stored_gen then acct_set('tier_gen', gen) end
  local prev = acct_get('tier')
  if prev ~= chosen.name and gen >= stored_gen then
    acct_set('tier', chosen.name)
    if prev then emit('tier.changed', {from = prev, to = chosen.name}, now) end
  end
  local rpm, tpm = chosen.rpm, chosen.tpm
  local own_rpm, own_tpm = acct_num('rl_rpm'), acct_num('rl_tpm')
  if own_rpm > 0 then rpm = own_rpm end
  if own_tpm > 0 then tpm = own_tpm end
  return chosen.name, rpm, tpm, chosen.model_rpm or 0, chosen.model_tpm or 0
end
