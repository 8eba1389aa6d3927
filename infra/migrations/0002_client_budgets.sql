-- Budgets per client, projected from the budget.set events of the budgets topic by the
-- process that owns ClickHouse (so it works with embedded chDB, whose read endpoint is
-- read-only, and with a server). The latest set_at wins; readers use FINAL or argMax.
CREATE TABLE IF NOT EXISTS {database}.client_budgets
(
    client_id    String,
    amount_usd   Decimal(18, 9),
    period       LowCardinality(String),
    set_at       DateTime64(3, 'UTC'),
    event_id     String
)
ENGINE = ReplacingMergeTree(set_at)
ORDER BY client_id;
