"""The cluster layout's DDL, checked by ClickHouse's own parser (chDB's ``formatQuery``),
and the migrator's pure decision. No server runs here: what a cluster does with the DDL
(Keeper paths, Distributed inserts) is not exercised."""

from __future__ import annotations

import re

import pytest
from clickhouse_connect.driver.client import Client
from pydantic import ValidationError

from aipipe.consumers.costs.layout import Layout, LayoutError
from aipipe.consumers.costs.migrations import (
    _VERSION_DDL,
    Applied,
    Migration,
    SchemaMismatchError,
    load_migrations,
    pending,
    placed,
    statements,
)
from aipipe.infra.settings import Settings

CLUSTER = Layout("aipipe", "main")


def cluster_statements() -> list[str]:
    return [*placed(_VERSION_DDL, CLUSTER),
            *(s for m in load_migrations() for s in placed(m.sql, CLUSTER))]


def formatted(client: Client, statement: str) -> str:
    """The statement as ClickHouse's parser reads it, on one line (raises when it cannot)."""
    [(text,)] = client.query("SELECT formatQuerySingleLine({q:String})",
                             parameters={"q": statement}).result_rows
    return str(text)


def test_every_cluster_statement_parses_and_runs_on_the_cluster(chdb_client: Client) -> None:
    out = [formatted(chdb_client, s) for s in cluster_statements()]

    inserts = [s for s in out if s.startswith("INSERT")]
    # 0011's one-off backfill and 0016's run-key cut-off, through the Distributed tables
    assert len(inserts) == 2
    assert all(" ON CLUSTER main " in s or s.endswith(" ON CLUSTER main")
               for s in out if not s.startswith("INSERT"))


def test_each_table_is_replicated_on_the_shards_and_distributed_by_its_key(
    chdb_client: Client,
) -> None:
    out = [formatted(chdb_client, s) for s in cluster_statements()]
    local = {m[1]: m[2] for s in out if (m := re.match(
        r"CREATE TABLE IF NOT EXISTS aipipe\.(\w+)_local ON CLUSTER main \(.*\) "
        r"ENGINE = (Replicated\w+\(.*?\))", s))}
    distributed = {m[1]: m[2] for s in out if (m := re.match(
        r"CREATE TABLE IF NOT EXISTS aipipe\.(\w+) ON CLUSTER main AS aipipe\.\1_local "
        r"ENGINE = Distributed\('main', 'aipipe', '\w+_local', (.*)\)$", s))}

    assert local == {
        "aipipe_schema_migrations": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}"
                                    "/aipipe/aipipe_schema_migrations_local', '{replica}', "
                                    "applied_at)",
        "ai_cost_tracking": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/aipipe/"
                            "ai_cost_tracking_local', '{replica}', ingested_at)",
        "client_budgets": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/aipipe/"
                          "client_budgets_local', '{replica}', set_at)",
        "replay_manifest": "ReplicatedMergeTree('/clickhouse/tables/{shard}/aipipe/"
                           "replay_manifest_local', '{replica}')",
        "ai_cost_daily_state": "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/"
                               "aipipe/ai_cost_daily_state_local', '{replica}')",
        "ai_cost_daily_sealed": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/"
                                "aipipe/ai_cost_daily_sealed_local', '{replica}', sealed_at)",
        "events_archive": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/aipipe/"
                          "events_archive_local', '{replica}', archived_at)",
        "ai_cost_run_keys": "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/aipipe/"
                            "ai_cost_run_keys_local', '{replica}', recorded_at)",
    }
    assert distributed == {
        "aipipe_schema_migrations": "cityHash64(version)",
        "ai_cost_tracking": "cityHash64(client_id)",
        "client_budgets": "cityHash64(client_id)",
        "replay_manifest": "cityHash64(finished_at)",
        "ai_cost_daily_state": "cityHash64(client_id)",
        "ai_cost_daily_sealed": "cityHash64(client_id)",
        "events_archive": "cityHash64(client_id)",
        "ai_cost_run_keys": "cityHash64(legacy_until)",
    }
    replicated = [s for s in out if "ENGINE = Replicated" in s]
    assert len(replicated) == 8
    for statement in replicated:
        assert statement.endswith(" SETTINGS replicated_deduplication_window = 1000, "
                                  "replicated_deduplication_window_seconds = 604800")


def test_the_rollup_view_is_fed_by_the_local_tables_and_alters_reach_both(
    chdb_client: Client,
) -> None:
    out = [formatted(chdb_client, s) for s in cluster_statements()]
    [mv] = [s for s in out if s.startswith("CREATE MATERIALIZED VIEW")]
    assert mv.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS aipipe.ai_cost_daily_mv "
                         "ON CLUSTER main TO aipipe.ai_cost_daily_state_local ")
    assert "FROM aipipe.ai_cost_tracking_local GROUP BY" in mv
    alters = [s.split(" (")[0] for s in out if s.startswith("ALTER")]
    assert alters == [
        # 0013 adds a column: to the replicated table and to the Distributed one
        "ALTER TABLE aipipe.ai_cost_tracking_local ON CLUSTER main",
        "ALTER TABLE aipipe.ai_cost_tracking ON CLUSTER main",
        # 0014 adds indexes, which only the replicated tables have
        "ALTER TABLE aipipe.ai_cost_tracking_local ON CLUSTER main",
        "ALTER TABLE aipipe.ai_cost_tracking_local ON CLUSTER main",
        "ALTER TABLE aipipe.events_archive_local ON CLUSTER main",
        "ALTER TABLE aipipe.events_archive_local ON CLUSTER main",
        # 0015 adds a column, as 0013
        "ALTER TABLE aipipe.ai_cost_tracking_local ON CLUSTER main",
        "ALTER TABLE aipipe.ai_cost_tracking ON CLUSTER main",
        # 0016 adds a column to both and extends the sorting key of the replicated one
        "ALTER TABLE aipipe.ai_cost_tracking_local ON CLUSTER main",
        "ALTER TABLE aipipe.ai_cost_tracking ON CLUSTER main",
    ]
    run_key = [s for s in out if s.startswith("ALTER") and "admitted_at" in s]
    assert [("MODIFY ORDER BY" in s) for s in run_key] == [True, False]


def test_one_node_keeps_the_statements_as_written() -> None:
    for migration in load_migrations():
        assert placed(migration.sql, Layout("aipipe")) == statements(migration.sql, "aipipe")


def test_a_statement_the_layout_does_not_know_is_refused() -> None:
    with pytest.raises(LayoutError, match=r"^The cluster layout cannot place the statement "
                                          r"'OPTIMIZE TABLE `aipipe`.x FINAL'"):
        CLUSTER.place("OPTIMIZE TABLE `aipipe`.x FINAL")
    with pytest.raises(LayoutError, match="AIPIPE_CLICKHOUSE_CLUSTER"):
        Layout("aipipe", "main; DROP")


M = [Migration(v, f"{v:04d}_m.sql", f"-- {v}") for v in (1, 2, 3)]


def test_pending_is_what_the_database_lacks_in_order() -> None:
    done = [Applied(1, M[0].name, M[0].checksum)]
    assert pending(M, done, "db") == M[1:]
    assert pending(M, [Applied(m.version, m.name, m.checksum) for m in M], "db") == []


def test_a_migration_numbered_below_the_applied_ones_is_refused() -> None:
    done = [Applied(m.version, m.name, m.checksum) for m in (M[0], M[2])]
    with pytest.raises(SchemaMismatchError) as refused:
        pending(M, done, "db")
    assert str(refused.value) == (
        "Migration 0002_m.sql is numbered below 0003_m.sql, already applied to database db; "
        "migrations only go forward, so renumber it after 0003_m.sql.")


def test_a_cluster_with_embedded_chdb_is_refused() -> None:
    with pytest.raises(ValidationError, match="CLICKHOUSE_CLUSTER needs a ClickHouse server"):
        Settings(clickhouse_cluster="main")
    assert Settings(clickhouse_cluster="main",
                    clickhouse_url="http://u:p@node1:8123").clickhouse_cluster == "main"
