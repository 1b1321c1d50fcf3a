-- onetoken ClickHouse schema, version 003: lookups on the security log.
-- Org admins filter their events by kind, actor and subject (an account or key id); the
-- sort key (org_id, ts, event_id) narrows by org and time, these skip indexes do the rest.

ALTER TABLE onetoken.security_log ADD INDEX IF NOT EXISTS idx_kind kind TYPE set(256) GRANULARITY 4;

ALTER TABLE onetoken.security_log ADD INDEX IF NOT EXISTS idx_actor actor_id TYPE bloom_filter(0.01) GRANULARITY 4;

ALTER TABLE onetoken.security_log ADD INDEX IF NOT EXISTS idx_subject subject_id TYPE bloom_filter(0.01) GRANULARITY 4;
