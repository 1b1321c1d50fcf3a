-- onetoken ClickHouse schema, version 007: names for the ids in the call log.
-- The control process copies orgs, providers, models and keys from the control DB into
-- these tables (periodically and after each change), so that queries can show names
-- where call_log holds ids. Names and display ids only: never key hashes, credentials,
-- e-mail addresses or anything secret. ReplacingMergeTree(updated_at): a re-sync writes a
-- newer row that replaces the older one, so read with FINAL; a thing deleted in the
-- control DB keeps its row with deleted = 1, so that old calls still show its name.
-- Shared database only: a pool's database holds its call_log and rollup, not these.
-- A sync that replaces a row merges the table at once (a renamed or erased name must not
-- linger); old_parts_lifetime then lets the replaced part go after a minute, as in 006.

CREATE TABLE IF NOT EXISTS onetoken.dim_orgs
(
    org_id     String COMMENT 'Organisation id, as call_log.org_id',
    name       String COMMENT 'Organisation name in the control DB at updated_at',
    deleted    UInt8 COMMENT '1 when the organisation no longer exists in the control DB, else 0',
    updated_at DateTime64(3, 'UTC') COMMENT 'When the sync wrote this row (UTC, milliseconds); the newest row per org_id wins under FINAL'
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY org_id
SETTINGS old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS onetoken.dim_providers
(
    provider_id String COMMENT 'Provider id, as call_log.provider',
    org_id      String COMMENT 'Organisation that owns the provider; empty for a platform-wide provider',
    name        String COMMENT 'Provider name in the control DB at updated_at',
    vendor      LowCardinality(String) COMMENT 'Vendor declared for the provider (openai, anthropic, google, ...); empty when not declared',
    region      LowCardinality(String) COMMENT 'Region the provider is declared in; empty when not declared',
    deleted     UInt8 COMMENT '1 when the provider no longer exists in the control DB, else 0',
    updated_at  DateTime64(3, 'UTC') COMMENT 'When the sync wrote this row (UTC, milliseconds); the newest row per provider_id wins under FINAL'
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY provider_id
SETTINGS old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS onetoken.dim_models
(
    org_id     String COMMENT 'Organisation whose providers serve the model; empty for a model of a platform-wide provider',
    model      String COMMENT 'Model name the upstream is asked for (a deployment''s upstream model), as call_log.model_served',
    vendor     LowCardinality(String) COMMENT 'Vendor declared for a provider that serves the model; empty when not declared',
    deleted    UInt8 COMMENT '1 when no provider of the organisation serves the model any more, else 0',
    updated_at DateTime64(3, 'UTC') COMMENT 'When the sync wrote this row (UTC, milliseconds); the newest row per (org_id, model) wins under FINAL'
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (org_id, model)
SETTINGS old_parts_lifetime = 60;

CREATE TABLE IF NOT EXISTS onetoken.dim_keys
(
    key_id     String COMMENT 'API key id, as call_log.key_id',
    org_id     String COMMENT 'Organisation the key belongs to',
    display_id String COMMENT 'The key''s public display form (prefix and last characters), never the secret or its hash',
    name       String COMMENT 'Key name given by its owner',
    deleted    UInt8 COMMENT '1 when the key no longer exists in the control DB, else 0',
    updated_at DateTime64(3, 'UTC') COMMENT 'When the sync wrote this row (UTC, milliseconds); the newest row per key_id wins under FINAL'
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY key_id
SETTINGS old_parts_lifetime = 60;
