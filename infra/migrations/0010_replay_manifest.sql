-- One row per `aipipe replay` into this database: what was read (topic, per-partition
-- offset ranges [start, end)), under which prices, and how many rows it wrote. The full
-- record is the JSON in `manifest`; `aipipe replay verify` reads the latest one.
CREATE TABLE IF NOT EXISTS {database}.replay_manifest
(
    replay_id      String,
    finished_at    DateTime64(3, 'UTC'),
    topic          String,
    price_version  String,
    events         UInt64,
    rows           UInt64,
    manifest       String
)
ENGINE = MergeTree
ORDER BY finished_at;
