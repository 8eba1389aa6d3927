-- Which run of the generation step each cost row comes from (operation.completed's
-- `attempt`): 1 for an operation that ran once, 2 and more after attempts interrupted by a
-- crash, which the provider may have billed too (README, "Streams under faults"). Rows
-- written before this column existed read 1. The cost sink also uses it to find an
-- operation's earlier row in another rollup bucket (consumers/costs/store.py).
ALTER TABLE {database}.ai_cost_tracking
    ADD COLUMN IF NOT EXISTS attempt UInt32 DEFAULT 1 AFTER client_occurred_at;
