-- Every message of every pipeline topic, as it was in Kafka: the audit trail. One row per
-- event: a redelivered or re-emitted event (same event_id, same topic) replaces its row at
-- merge time, so count with FINAL or uniqExact(event_id). payload is the event's JSON
-- (read fields with JSONExtractString(payload, 'reason') and the like). A message that is
-- not a valid event is kept too, as event_type 'invalid', and a dead-lettered message as
-- event_type 'deadletter' with the reason; both keyed by their Kafka coordinates.
CREATE TABLE IF NOT EXISTS {database}.events_archive
(
    event_id           String,
    event_type         LowCardinality(String),
    client_id          LowCardinality(String),
    request_id         String,
    operation_id       String,
    occurred_at        DateTime64(3, 'UTC'),
    payload            String,
    deadletter_reason  String,
    kafka_topic        LowCardinality(String),
    kafka_partition    UInt32,
    kafka_offset       UInt64,
    kafka_timestamp    DateTime64(3, 'UTC'),
    archived_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(archived_at)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (event_type, client_id, kafka_topic, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
