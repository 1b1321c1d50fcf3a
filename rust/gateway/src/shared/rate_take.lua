-- Take units of a global per-minute limit for one instance's lease, give back unused ones
-- and add usage above what was taken (docs/scale-out.md, "Rates").
-- KEYS[1] = ot:{k:<key>}:rpm (or :tpm, or {o:<org>}), the GCRA theoretical arrival time,
-- µs on Redis' clock. ARGV[1] = limit per minute, ARGV[2] = units wanted, ARGV[3] = units
-- given back, ARGV[4] = units owed (used above what was taken).
-- Returns the units granted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = 60000000
local per = period / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
tat = tat + (tonumber(ARGV[4]) - tonumber(ARGV[3])) * per
if tat < now then
  tat = now
end
local room = math.floor((now + period - tat) / per)
local grant = math.min(tonumber(ARGV[2]), math.max(room, 0))
tat = tat + grant * per
-- %d: Lua would write a large number in exponent form. The bucket is full again after a
-- period past its arrival time, so the key may go then.
redis.call('SET', KEYS[1], string.format('%d', math.ceil(tat)), 'PX',
  string.format('%d', math.ceil((tat - now) / 1000) + period / 1000))
return grant
