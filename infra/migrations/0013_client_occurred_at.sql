-- The client's own occurred_at of each operation, kept apart from requested_at. Since
-- admission stamps requested_at with the pipeline's clock (it picks the month partition
-- and the price table), the client's clock never bills; it stays here for analysts.
-- NULL for operations admitted before this column existed. Idempotent (IF NOT EXISTS).
ALTER TABLE {database}.ai_cost_tracking
    ADD COLUMN IF NOT EXISTS client_occurred_at Nullable(DateTime64(3, 'UTC')) AFTER kafka_offset;
