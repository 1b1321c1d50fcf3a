-- onetoken ClickHouse schema, version 006: account erasure and data export.
-- Cancelling an account rewrites its call_log rows (ALTER TABLE ... UPDATE, see
-- docs/retention.md) and an export aggregates them; both select by account_id or key_id
-- across all orgs' time range, which the sort key (org_id, ts, request_id) cannot narrow.

ALTER TABLE onetoken.call_log ADD INDEX IF NOT EXISTS idx_account account_id TYPE bloom_filter(0.01) GRANULARITY 4;

ALTER TABLE onetoken.call_log ADD INDEX IF NOT EXISTS idx_key key_id TYPE bloom_filter(0.01) GRANULARITY 4;

-- A mutation writes new parts and keeps the replaced ones on disk as "outdated" for
-- old_parts_lifetime (default 480 s) in case of a crash; erased values should leave the
-- disk sooner, so keep outdated parts for one minute.
ALTER TABLE onetoken.call_log MODIFY SETTING old_parts_lifetime = 60;

ALTER TABLE onetoken.security_log MODIFY SETTING old_parts_lifetime = 60;
