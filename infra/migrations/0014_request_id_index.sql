-- The first migration made for the versioned migrator (aipipe_schema_migrations): each
-- file from here on is applied once, so it may alter what exists; keep its statements
-- idempotent all the same (two migrators may meet on a server, see migrations.py).
--
-- "What happened to request req-…?": a bloom filter on request_id lets such a lookup read
-- only the granules that may hold it, in the cost rows and in the event archive. Parts
-- written before this migration are indexed by MATERIALIZE INDEX, in the background.
ALTER TABLE {database}.ai_cost_tracking
    ADD INDEX IF NOT EXISTS request_id_bloom request_id TYPE bloom_filter(0.01) GRANULARITY 4;
ALTER TABLE {database}.ai_cost_tracking MATERIALIZE INDEX request_id_bloom;
ALTER TABLE {database}.events_archive
    ADD INDEX IF NOT EXISTS request_id_bloom request_id TYPE bloom_filter(0.01) GRANULARITY 4;
ALTER TABLE {database}.events_archive MATERIALIZE INDEX request_id_bloom;
