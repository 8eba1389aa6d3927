-- One cost row per run of an operation, not per operation id. The sorting key, which
-- ReplacingMergeTree deduplicates by, was (client_id, operation_id): a client that sent an
-- id again after the dedup horizon, with a fresh occurred_at, had it admitted and run again
-- (and billed by the provider again), and the second run's row replaced the first, so only
-- one run was costed. admitted_at is the run's admission time (its requested_at): every
-- copy of one run (a redelivered completion, a re-run after a crash) shares it, another
-- admission does not.
--
-- Rows written before this migration have no admitted_at (1970-01-01), and a copy of one of
-- them written later must keep that key or it would count twice: ai_cost_run_keys keeps the
-- latest requested_at stored when this migration ran, and the cost sink writes 1970-01-01
-- as admitted_at for a row requested at or before it (consumers/costs/store.py). On an
-- empty table that time is 1970-01-01 itself: every row gets its own admission time.
CREATE TABLE IF NOT EXISTS {database}.ai_cost_run_keys
(
    legacy_until DateTime64(3, 'UTC'),
    recorded_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(recorded_at)
ORDER BY legacy_until;

-- before the column exists, so only rows written before this migration are read; once,
-- while the table is empty (a second migrator finds it filled: HAVING drops the one row
-- an aggregate gives even over no rows)
INSERT INTO {database}.ai_cost_run_keys (legacy_until)
SELECT max(requested_at) FROM {database}.ai_cost_tracking
HAVING (SELECT count() FROM {database}.ai_cost_run_keys) = 0;

ALTER TABLE {database}.ai_cost_tracking
    ADD COLUMN IF NOT EXISTS admitted_at DateTime64(3, 'UTC') AFTER attempt,
    MODIFY ORDER BY (client_id, operation_id, admitted_at);
