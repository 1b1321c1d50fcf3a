-- onetoken ClickHouse schema, version 009: what each column of security_log and
-- schema_migrations means, as ClickHouse column comments (DESCRIBE and system.columns
-- show them; docs/analytics.md is generated from them). call_log's comments come from
-- the engine's column declaration instead, set when the schema is opened
-- (analytics.clickhouse.ensure_call_log_comments), so they have one source.

ALTER TABLE onetoken.schema_migrations COMMENT COLUMN version 'Migration number: the three digits that start its file name.';

ALTER TABLE onetoken.schema_migrations COMMENT COLUMN name 'Migration file name.';

ALTER TABLE onetoken.schema_migrations COMMENT COLUMN checksum 'SHA-256 (hex) of the file as it was applied; a different file under the same number is logged as analytics.migration_changed.';

ALTER TABLE onetoken.schema_migrations COMMENT COLUMN applied_at 'When the migration was applied, UTC, milliseconds.';

ALTER TABLE onetoken.security_log COMMENT COLUMN ts 'When the event happened, UTC, microsecond precision.';

ALTER TABLE onetoken.security_log COMMENT COLUMN event_id 'Unique event id (32 hex digits). A spooled batch replayed after a crash repeats it: count events with uniqExact(event_id) or read with FINAL.';

ALTER TABLE onetoken.security_log COMMENT COLUMN kind 'Event kind, a dotted lowercase name such as auth.login_failed, key.revoked_used or admin.role_changed; the auth.* kinds (login records) have their own retention. Catalogue in docs/security.md.';

ALTER TABLE onetoken.security_log COMMENT COLUMN severity 'One of info, low, medium, high, critical (in rising order).';

ALTER TABLE onetoken.security_log COMMENT COLUMN org_id 'Org the event concerns; empty for a platform-wide event.';

ALTER TABLE onetoken.security_log COMMENT COLUMN actor_id 'Who did it: an account id or API key id; empty when unknown (for example a failed login with an unknown name).';

ALTER TABLE onetoken.security_log COMMENT COLUMN subject_id 'What it was done to: an account, key, org or other object id; empty when none.';

ALTER TABLE onetoken.security_log COMMENT COLUMN source_ip 'Client address of the request that caused the event; empty when not from a request.';

ALTER TABLE onetoken.security_log COMMENT COLUMN user_agent 'The client''s User-Agent header, cut to 256 bytes; empty when absent.';

ALTER TABLE onetoken.security_log COMMENT COLUMN detail 'Flat JSON object of metadata (ids, counts, categories, CIDRs; strings cut to 512 characters), never request content. Read fields with JSONExtractString(detail, ''field'') and similar.';
