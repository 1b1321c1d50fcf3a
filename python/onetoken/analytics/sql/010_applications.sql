-- onetoken ClickHouse schema, version 010: applications (docs/applications.md).
-- call_log.application_id: the application the key belonged to when the call was made,
-- '' for a key in none (and for rows written before the column existed). Added last so
-- the column order stays the engine's declaration (rust/gateway/src/call_log.rs).
-- dim_applications: their names, synced from the control DB like the other dims (shared
-- database only; names only, never anything secret).

ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS application_id LowCardinality(String) DEFAULT '';

CREATE TABLE IF NOT EXISTS onetoken.dim_applications
(
    application_id String COMMENT 'Application id, as call_log.application_id',
    org_id         String COMMENT 'Organisation the application belongs to',
    name           String COMMENT 'Application name in the control DB at updated_at',
    deleted        UInt8 COMMENT '1 when the application no longer exists in the control DB, else 0',
    updated_at     DateTime64(3, 'UTC') COMMENT 'When the sync wrote this row (UTC, milliseconds); the newest row per application_id wins under FINAL'
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY application_id
SETTINGS old_parts_lifetime = 60;
