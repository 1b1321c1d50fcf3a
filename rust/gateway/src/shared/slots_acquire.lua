-- Set one instance's concurrency slots for a key or org (docs/scale-out.md, "Concurrency").
-- KEYS[1] = ot:{k:<key>}:conc or ot:{o:<org>}:conc, hash <instance> -> "slots:expires_ms"
-- ARGV[1] = instance, ARGV[2] = slots wanted, ARGV[3] = slots in flight (kept whatever the
-- others hold: they are running), ARGV[4] = the limit, ARGV[5] = ttl ms
-- Returns {granted, slots the other live instances hold}. Expired fields (an instance
-- that stopped heartbeating) are deleted and count for nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local field, value = fields[i], fields[i + 1]
  if field ~= ARGV[1] then
    local slots, expires = string.match(value, '^(%d+):(%d+)$')
    if slots and tonumber(expires) > now then
      others = others + tonumber(slots)
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
local ttl = tonumber(ARGV[5])
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[4]) - others)
local keep = tonumber(ARGV[3])
if grant < keep then
  grant = keep
end
if grant <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return {0, others}
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d:%d', grant, now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {grant, others}
