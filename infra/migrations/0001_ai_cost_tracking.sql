-- One row per completed operation. Statements are idempotent; {database} is replaced
-- by the quoted database name.
CREATE DATABASE IF NOT EXISTS {database};

-- ReplacingMergeTree keyed by (client_id, operation_id): a redelivered or re-run
-- operation replaces its row at merge time, the latest ingested_at winning, and readers use
-- FINAL so totals are exact before any merge. requested_at is the original request's
-- time, the same on every re-run, so all copies of one operation share a partition.
-- non_replicated_deduplication_window makes a retried insert with the same
-- insert_deduplication_token a no-op.
CREATE TABLE IF NOT EXISTS {database}.ai_cost_tracking
(
    operation_id           String,
    event_id               String,
    client_id              LowCardinality(String),
    user_id                Nullable(String),
    request_id             String,
    job_id                 Nullable(String),
    operation_type         LowCardinality(String),
    provider               LowCardinality(String),
    model                  LowCardinality(String),
    cost_usd               Decimal(18, 9),
    price_version          LowCardinality(String),
    input_tokens           Nullable(UInt64),
    output_tokens          Nullable(UInt64),
    image_count            Nullable(UInt64),
    video_duration_seconds Nullable(Decimal(18, 9)),
    poll_count             UInt64,
    metadata               String,
    success                Bool,
    error_message          Nullable(String),
    duration_ms            UInt64,
    requested_at           DateTime64(3, 'UTC'),
    created_at             DateTime64(3, 'UTC'),
    kafka_topic            LowCardinality(String),
    kafka_partition        UInt32,
    kafka_offset           UInt64,
    ingested_at            DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(requested_at)
ORDER BY (client_id, operation_id)
SETTINGS non_replicated_deduplication_window = 1000;
