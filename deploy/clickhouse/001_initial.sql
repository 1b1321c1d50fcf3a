-- onetoken ClickHouse schema, version 001.
-- Every statement is idempotent (IF NOT EXISTS): ClickHouse DDL is not transactional, so a
-- migration interrupted half-way is finished by simply running it again.

CREATE DATABASE IF NOT EXISTS onetoken;

-- Which migrations have run. ReplacingMergeTree so that re-recording a version is harmless.
CREATE TABLE IF NOT EXISTS onetoken.schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version;

-- One row per relayed request: call metadata only, never request or response content.
-- Columns and types are exactly tests/contract/call_log_columns.json.
-- ReplacingMergeTree ordered by (org_id, ts, request_id): a record replayed from the spool
-- collapses with its first copy (read with FINAL or uniqExact(request_id)); the dedup window
-- lets inserts that carry insert_deduplication_token drop a re-sent batch outright.
-- The TTL here is the default retention; the control plane rewrites it at startup from
-- ONETOKEN_CALL_LOG_TTL_DAYS (ALTER TABLE ... MODIFY TTL).
CREATE TABLE IF NOT EXISTS onetoken.call_log
(
    ts                DateTime64(6, 'UTC'),
    request_id        String,
    org_id            String,
    account_id        String,
    key_id            String,
    path              LowCardinality(String),
    model_requested   LowCardinality(String),
    model_served      LowCardinality(String),
    provider          LowCardinality(String),
    prompt_tokens     UInt32,
    completion_tokens UInt32,
    cached_tokens     UInt32,
    usage_source      LowCardinality(String),
    cost              Int64,
    status            UInt16,
    error_code        LowCardinality(String),
    latency_us        UInt32,
    ttfb_us           UInt32,
    streamed          UInt8,
    source_ip         String,
    user_agent        String,
    rate_limit        LowCardinality(String),
    attempts          UInt8
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (org_id, ts, request_id)
TTL ts + INTERVAL 180 DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- Security and risk events: who, what kind, how severe, and metadata (detail is a JSON
-- object of metadata fields, never request content).
CREATE TABLE IF NOT EXISTS onetoken.security_log
(
    ts         DateTime64(6, 'UTC'),
    event_id   String,
    kind       LowCardinality(String),
    severity   LowCardinality(String),
    org_id     String,
    actor_id   String,
    subject_id String,
    source_ip  String,
    user_agent String,
    detail     String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (org_id, ts, event_id)
TTL ts + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000;
