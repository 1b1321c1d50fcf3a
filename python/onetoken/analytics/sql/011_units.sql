-- onetoken ClickHouse schema, version 011: the units a call was priced by besides tokens
-- (images, audio, speech characters, rerank search units; docs/gateway-spec.md, "Unit
-- prices"). Counts only, never the images, audio or documents themselves. Added last so
-- that the column order follows the engine's declaration; rows written before the columns
-- existed read as 0. The column comments come from the engine (009).

ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS images UInt32 DEFAULT 0;
ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS audio_ms UInt32 DEFAULT 0;
ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS characters UInt32 DEFAULT 0;
ALTER TABLE onetoken.call_log ADD COLUMN IF NOT EXISTS search_units UInt32 DEFAULT 0;
