-- Grow one instance's money lease against its org's cap (docs/scale-out.md, "Money").
-- KEYS[1] = ot:{o:<org>}:cap, KEYS[2] = ot:{o:<org>}:hold
-- ARGV[1] = instance, ARGV[2] = money wanted, ARGV[3] = the hold the instance believes it has
-- Returns {granted, hold}, or {-1, hold} when the org has no cap (nothing is granted).
--
-- Lua numbers are doubles: every figure must stay below 2^53 nano-units to be exact, so
-- the script refuses (grants nothing) past that rather than round money.
local EXACT = 9007199254740992
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local known = tonumber(ARGV[3])
-- Redis lost the hold (restarted without persistence) or a grow reply was lost the other
-- way: the instance re-asserts what it may already be spending against, so the sum below
-- counts it and nothing is granted twice.
if known > held then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  held = known
end
local cap = redis.call('HGET', KEYS[1], 'cap')
if not cap then
  return {-1, held}
end
cap = tonumber(cap)
local sum = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  sum = sum + tonumber(v)
end
local want = tonumber(ARGV[2])
if cap >= EXACT or sum >= EXACT or want >= EXACT then
  return {-1, held}
end
local grant = math.min(want, cap - sum)
if grant <= 0 then
  return {0, held}
end
-- %d, not tostring: Lua would write a large number in exponent form.
held = redis.call('HINCRBY', KEYS[2], ARGV[1], string.format('%d', grant))
return {grant, held}
