-- Add one instance's settled spend to a key's or org's UTC day and month totals, for
-- budgets (docs/scale-out.md, "Budgets"). KEYS[1] = ...:spend:d:<yyyymmdd>,
-- KEYS[2] = ...:spend:m:<yyyymm>; ARGV[1] = spend, nano-units (may be 0: a read).
-- Returns {day total, month total}. The keys outlive their period by a little, then go.
local day = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 3 * 86400)
local month = redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], 35 * 86400)
return {day, month}
