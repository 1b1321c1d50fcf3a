-- Say one instance is live and count the live ones (docs/scale-out.md, `ot:gateways`).
-- KEYS[1] = ot:gateways; ARGV[1] = instance, ARGV[2] = ms after which a heartbeat is stale.
-- Returns the number of live instances.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now - tonumber(ARGV[2])))
return redis.call('ZCARD', KEYS[1])
