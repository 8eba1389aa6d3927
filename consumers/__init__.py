"""Kafka consumers that project the event log elsewhere: the cost sink into ClickHouse."""
