-- Daily rollups per client / operation type / model, and the view analysts read,
-- `ai_cost_daily`, exact at any moment even when duplicates arrive. See ANALYSTS.md.
--
-- ai_cost_daily_state: sums of every inserted row per bucket, kept by a materialized view.
-- It counts a duplicate twice (a view cannot look rows up), so it is never read alone:
-- its `rows` is how a bucket proves it did not change.
-- ai_cost_daily_sealed: exact values per bucket of a closed day, computed from
-- ai_cost_tracking FINAL by the process that owns ClickHouse (the "sealer", every
-- AIPIPE_ROLLUP_SEAL_SECONDS), with the bucket's `rows` at that moment.
-- A bucket is answered from its seal while its `rows` still equals `rows_at_seal`: no row
-- (duplicate or new) arrived since. Every other bucket (today's, one not sealed yet, one
-- that received a row after sealing) is answered from ai_cost_tracking FINAL. A bucket is
-- made only of facts that every copy of an operation shares (the day of requested_at,
-- client, type, model), so a duplicate always lands in the bucket of its original.
CREATE TABLE IF NOT EXISTS {database}.ai_cost_daily_state
(
    day            Date,
    client_id      LowCardinality(String),
    operation_type LowCardinality(String),
    model          LowCardinality(String),
    rows           SimpleAggregateFunction(sum, UInt64),
    successes      SimpleAggregateFunction(sum, UInt64),
    cost_usd       SimpleAggregateFunction(sum, Decimal(38, 9)),
    duration_ms    SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (client_id, day, operation_type, model);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.ai_cost_daily_mv
TO {database}.ai_cost_daily_state AS
SELECT
    toDate(requested_at)                AS day,
    client_id,
    operation_type,
    model,
    count()                             AS rows,
    countIf(success)                    AS successes,
    sum(toDecimal128(cost_usd, 9))      AS cost_usd,
    sum(duration_ms)                    AS duration_ms
FROM {database}.ai_cost_tracking
GROUP BY day, client_id, operation_type, model;

-- Rows written before this migration existed: fold them in once (only while the rollup is
-- empty). They only make buckets unsealed until the sealer has seen them.
INSERT INTO {database}.ai_cost_daily_state
SELECT toDate(requested_at), client_id, operation_type, model, count(), countIf(success),
       sum(toDecimal128(cost_usd, 9)), sum(duration_ms)
FROM {database}.ai_cost_tracking
WHERE (SELECT count() FROM {database}.ai_cost_daily_state) = 0
GROUP BY toDate(requested_at), client_id, operation_type, model;

CREATE TABLE IF NOT EXISTS {database}.ai_cost_daily_sealed
(
    day            Date,
    client_id      LowCardinality(String),
    operation_type LowCardinality(String),
    model          LowCardinality(String),
    operations     UInt64,
    successes      UInt64,
    cost_usd       Decimal(38, 9),
    duration_ms    UInt64,
    rows_at_seal   UInt64,
    sealed_at      DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(sealed_at)
PARTITION BY toYYYYMM(day)
ORDER BY (client_id, day, operation_type, model);

CREATE VIEW IF NOT EXISTS {database}.ai_cost_daily AS
SELECT day, client_id, operation_type, model, operations, successes,
       operations - successes AS failures, cost_usd, duration_ms, 'sealed' AS source
FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        )
        GROUP BY day, client_id, operation_type, model
    )
WHERE inserted = rows_at_seal
UNION ALL
SELECT toDate(requested_at) AS day, client_id, operation_type, model, count() AS operations,
       countIf(success) AS successes, count() - countIf(success) AS failures,
       sum(toDecimal128(cost_usd, 9)) AS cost_usd, sum(duration_ms) AS duration_ms,
       'raw' AS source
FROM {database}.ai_cost_tracking FINAL
WHERE (client_id, toDate(requested_at), operation_type, model) IN
      (SELECT client_id, day, operation_type, model FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        )
        GROUP BY day, client_id, operation_type, model
    )
       WHERE inserted != rows_at_seal)
GROUP BY day, client_id, operation_type, model;

-- The same over days [start, end) as a parameterized view, which keeps the duplicate
-- check and the raw table's part to those days: the fast way to ask about a period, e.g.
-- SELECT … FROM ai_cost_daily_between(start = '2026-10-01', end = '2026-11-01').
CREATE VIEW IF NOT EXISTS {database}.ai_cost_daily_between AS
SELECT day, client_id, operation_type, model, operations, successes,
       operations - successes AS failures, cost_usd, duration_ms, 'sealed' AS source
FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
        WHERE day >= {start:Date} AND day < {end:Date}
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        WHERE day >= {start:Date} AND day < {end:Date}
        )
        GROUP BY day, client_id, operation_type, model
    )
WHERE inserted = rows_at_seal
UNION ALL
SELECT toDate(requested_at) AS day, client_id, operation_type, model, count() AS operations,
       countIf(success) AS successes, count() - countIf(success) AS failures,
       sum(toDecimal128(cost_usd, 9)) AS cost_usd, sum(duration_ms) AS duration_ms,
       'raw' AS source
FROM {database}.ai_cost_tracking FINAL
WHERE (client_id, toDate(requested_at), operation_type, model) IN
      (SELECT client_id, day, operation_type, model FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
        WHERE day >= {start:Date} AND day < {end:Date}
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        WHERE day >= {start:Date} AND day < {end:Date}
        )
        GROUP BY day, client_id, operation_type, model
    )
       WHERE inserted != rows_at_seal)
  AND requested_at >= toDateTime64({start:Date}, 3, 'UTC')
  AND requested_at < toDateTime64({end:Date}, 3, 'UTC')
GROUP BY day, client_id, operation_type, model;

-- And for one client: ai_cost_daily_client(client = 'acme', start = …, end = …), what a
-- budget check or a client's monthly summary asks.
CREATE VIEW IF NOT EXISTS {database}.ai_cost_daily_client AS
SELECT day, client_id, operation_type, model, operations, successes,
       operations - successes AS failures, cost_usd, duration_ms, 'sealed' AS source
FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
        WHERE client_id = {client:String} AND day >= {start:Date} AND day < {end:Date}
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        WHERE client_id = {client:String} AND day >= {start:Date} AND day < {end:Date}
        )
        GROUP BY day, client_id, operation_type, model
    )
WHERE inserted = rows_at_seal
UNION ALL
SELECT toDate(requested_at) AS day, client_id, operation_type, model, count() AS operations,
       countIf(success) AS successes, count() - countIf(success) AS failures,
       sum(toDecimal128(cost_usd, 9)) AS cost_usd, sum(duration_ms) AS duration_ms,
       'raw' AS source
FROM {database}.ai_cost_tracking FINAL
WHERE (client_id, toDate(requested_at), operation_type, model) IN
      (SELECT client_id, day, operation_type, model FROM (
        SELECT day, client_id, operation_type, model,
               sumIf(rows, kind = 0) AS inserted,
               argMaxIf(rows, sealed_at, kind = 1) AS rows_at_seal,
               argMaxIf(operations, sealed_at, kind = 1) AS operations,
               argMaxIf(successes, sealed_at, kind = 1) AS successes,
               argMaxIf(cost_usd, sealed_at, kind = 1) AS cost_usd,
               argMaxIf(duration_ms, sealed_at, kind = 1) AS duration_ms
        FROM
        (
            SELECT day, client_id, operation_type, model, 0 AS kind, rows,
                   toDateTime64(0, 3, 'UTC') AS sealed_at, toUInt64(0) AS operations,
                   toUInt64(0) AS successes, toDecimal128(0, 9) AS cost_usd,
                   toUInt64(0) AS duration_ms
            FROM {database}.ai_cost_daily_state
        WHERE client_id = {client:String} AND day >= {start:Date} AND day < {end:Date}
            UNION ALL
            SELECT day, client_id, operation_type, model, 1 AS kind, rows_at_seal AS rows,
                   sealed_at, operations, successes, cost_usd, duration_ms
            FROM {database}.ai_cost_daily_sealed
        WHERE client_id = {client:String} AND day >= {start:Date} AND day < {end:Date}
        )
        GROUP BY day, client_id, operation_type, model
    )
       WHERE inserted != rows_at_seal)
  AND client_id = {client:String}
  AND requested_at >= toDateTime64({start:Date}, 3, 'UTC')
  AND requested_at < toDateTime64({end:Date}, 3, 'UTC')
GROUP BY day, client_id, operation_type, model;
