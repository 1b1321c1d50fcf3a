-- onetoken ClickHouse schema, version 008: the per-minute rollup that dashboards read.
-- A materialized view aggregates every block inserted into call_log into call_stats_1m,
-- one row per (org, minute, model, provider, status, error code) and insert; background
-- merges of the AggregatingMergeTree fold those rows together. Read with sum() of the
-- counters and quantilesTDigestMerge of the states, grouped by what the query needs: the
-- rows of one key are only folded eventually. The rollup holds no account, key, address
-- or request ids, so account erasure (docs/retention.md) has nothing to rewrite here.
-- Exact money comes only from call_log FINAL and the ledger: a re-sent batch that
-- ClickHouse did not deduplicate (outside its deduplication window) collapses in call_log
-- under FINAL but counts twice here. Its TTL follows call_log's (ONETOKEN_CALL_LOG_TTL_DAYS).

CREATE TABLE IF NOT EXISTS onetoken.call_stats_1m
(
    minute            DateTime('UTC') COMMENT 'Start of the minute of the calls (toStartOfMinute(call_log.ts), UTC)',
    org_id            String COMMENT 'Organisation id, as call_log.org_id',
    model_served      LowCardinality(String) COMMENT 'Model the upstream was asked for, as call_log.model_served (empty when no upstream was tried)',
    provider          LowCardinality(String) COMMENT 'Provider id that served the call, as call_log.provider (empty when none)',
    status            UInt16 COMMENT 'HTTP status returned to the client (a stream cut after its 200 keeps 200: count errors by error_code)',
    error_code        LowCardinality(String) COMMENT 'OpenAI-shaped error code returned to the client; empty on success',
    calls             SimpleAggregateFunction(sum, UInt64) COMMENT 'Number of calls',
    streamed_calls    SimpleAggregateFunction(sum, UInt64) COMMENT 'Calls answered as a stream (call_log.streamed = 1)',
    rate_limited      SimpleAggregateFunction(sum, UInt64) COMMENT 'Calls refused by a rate limit (call_log.rate_limit = limited)',
    guard_flagged     SimpleAggregateFunction(sum, UInt64) COMMENT 'Calls in which the sensitive-content guard found something (call_log.guard_flags not empty)',
    prompt_tokens     SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of prompt (input) tokens',
    completion_tokens SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of completion (output) tokens',
    cached_tokens     SimpleAggregateFunction(sum, UInt64) COMMENT 'Sum of prompt tokens served from the upstream cache',
    cost              SimpleAggregateFunction(sum, Int64) COMMENT 'Sum of call cost in nano-units of the billing currency (1e-9); for dashboards, exact money is call_log FINAL or the ledger',
    latency_us_q      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32) COMMENT 'T-digest state of the end-to-end latency in microseconds; read with quantilesTDigestMerge(0.5, 0.95, 0.99)',
    ttfb_us_q         AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32) COMMENT 'T-digest state of the time to first byte in microseconds, streamed calls only; read with quantilesTDigestMerge(0.5, 0.95, 0.99)'
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (org_id, minute, model_served, provider, status, error_code)
TTL minute + INTERVAL 180 DAY
SETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60;

CREATE MATERIALIZED VIEW IF NOT EXISTS onetoken.call_stats_1m_mv TO onetoken.call_stats_1m AS
SELECT
    toStartOfMinute(toDateTime(ts, 'UTC')) AS minute,
    org_id,
    model_served,
    provider,
    status,
    error_code,
    toUInt64(count()) AS calls,
    toUInt64(countIf(streamed = 1)) AS streamed_calls,
    toUInt64(countIf(rate_limit = 'limited')) AS rate_limited,
    toUInt64(countIf(guard_flags != '')) AS guard_flagged,
    toUInt64(sum(prompt_tokens)) AS prompt_tokens,
    toUInt64(sum(completion_tokens)) AS completion_tokens,
    toUInt64(sum(cached_tokens)) AS cached_tokens,
    toInt64(sum(cost)) AS cost,
    quantilesTDigestState(0.5, 0.95, 0.99)(latency_us) AS latency_us_q,
    quantilesTDigestIfState(0.5, 0.95, 0.99)(ttfb_us, streamed = 1) AS ttfb_us_q
FROM onetoken.call_log
GROUP BY minute, org_id, model_served, provider, status, error_code;
