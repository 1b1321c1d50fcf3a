-- Give back part of an idle instance's money lease: lower its hold to ARGV[2], never raise it.
-- KEYS[1] = ot:{o:<org>}:hold; ARGV[1] = instance, ARGV[2] = new hold
local held = redis.call('HGET', KEYS[1], ARGV[1])
local new = tonumber(ARGV[2])
if held and tonumber(held) > new then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return new
end
return tonumber(held or '0')
