-- onetoken ClickHouse schema, version 002: the sensitive-content guard result per call.
-- 'category:count' pairs joined by ',' (e.g. 'bank_card:2,phone:1'), '' when the guard is
-- off or found nothing. Categories and counts only, never the matched text. Added last so
-- that the column order stays tests/contract/call_log_columns.json; rows written before
-- the column existed read as ''.

ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS guard_flags LowCardinality(String) DEFAULT '';
