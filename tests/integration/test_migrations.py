"""The versioned migrator on the real engine (chDB): from release 0.1's schema, twice,
and its refusals.

``tests/fixtures/migrations-0.1`` holds the migration files as release 0.1 shipped them
(``IF NOT EXISTS`` DDL run on every start, no version table).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from aipipe.consumers.costs.layout import Layout
from aipipe.consumers.costs.migrations import (
    VERSION_TABLE,
    SchemaMismatchError,
    _record,
    load_migrations,
    migrate,
    migration_scripts,
    placed,
    statements,
)
from aipipe.consumers.costs.rows import COLUMNS
from aipipe.consumers.costs.store import ClickHouseCostStore
from tests.support.rows import T0
from tests.support.rows import cost_row as row

RELEASE_0_1 = Path(__file__).parents[1] / "fixtures" / "migrations-0.1"
SHIPPED = [m.name for m in load_migrations()]


def fresh_database() -> str:
    return f"mig_{uuid.uuid4().hex[:12]}"


def release_0_1_database(client: Client) -> str:
    """A database made the way release 0.1 made it: every file's statements, in order."""
    database = fresh_database()
    for _, sql in migration_scripts(RELEASE_0_1):
        for statement in statements(sql, database):
            client.command(statement)
    return database


def recorded(client: Client, database: str) -> list[tuple[int, str]]:
    """The version table as stored, without FINAL: a doubled row would show."""
    return [(int(v), str(n)) for v, n in client.query(
        f"SELECT version, name FROM `{database}`.{VERSION_TABLE} ORDER BY version, name"
    ).result_rows]


def indexes(client: Client, database: str) -> list[tuple[str, str]]:
    return [(str(t), str(n)) for t, n in client.query(
        "SELECT table, name FROM system.data_skipping_indices WHERE database = {db:String} "
        "ORDER BY table, name", parameters={"db": database}).result_rows]


def test_a_release_0_1_database_is_migrated_once_and_keeps_its_data(
    chdb_client: Client,
) -> None:
    database = release_0_1_database(chdb_client)
    store = ClickHouseCostStore(chdb_client, database)
    # rows as release 0.1 wrote them: its columns only (0015 and 0016 add two)
    old_columns = [c for c in COLUMNS if c not in ("attempt", "admitted_at")]
    chdb_client.insert("ai_cost_tracking", [
        [getattr(row(f"op-{i}", "0.000000007", client_id=f"c{i % 3}", created_at=T0,
                     offset=i), c) for c in old_columns] for i in range(30)],
        column_names=old_columns, database=database)
    chdb_client.command(f"INSERT INTO `{database}`.client_budgets VALUES "
                        "('c1', 12.5, 'month', '2025-11-01 00:00:00', 'evt-b')")
    assert indexes(chdb_client, database) == []

    applied = migrate(chdb_client, database)

    assert [m.name for m in applied] == SHIPPED
    expected = [(int(name[:4]), name) for name in SHIPPED]
    assert recorded(chdb_client, database) == expected
    assert store.totals() == {c: (10, Decimal("0.000000070")) for c in ("c0", "c1", "c2")}
    assert chdb_client.query(f"SELECT client_id, amount_usd FROM `{database}`.client_budgets "
                             "FINAL").result_rows == [("c1", Decimal("12.5"))]
    # what 0014 adds to tables that already existed
    assert indexes(chdb_client, database) == [("ai_cost_tracking", "request_id_bloom"),
                                              ("events_archive", "request_id_bloom")]
    # what 0015 adds: those rows read attempt 1
    assert chdb_client.query(f"SELECT DISTINCT attempt FROM `{database}`.ai_cost_tracking"
                             ).result_rows == [(1,)]
    # what 0016 adds: a copy of a row written before it (a completion redelivered across
    # the upgrade) replaces it; a run admitted after it is another row
    copy = row("op-1", "0.000000009", client_id="c1", created_at=T0, offset=31)
    later = replace(row("op-2", "0.000000001", client_id="c2", created_at=T0, offset=32),
                    requested_at=T0 + timedelta(minutes=1), event_id="evt-op-2-again")
    store.write([copy, later], dedup_token="after-upgrade")
    assert store.totals() == {"c0": (10, Decimal("0.000000070")),
                              "c1": (10, Decimal("0.000000072")),
                              "c2": (11, Decimal("0.000000071"))}
    # the rollup view still answers from the rows written before the upgrade
    [(operations, cost)] = chdb_client.query(
        f"SELECT sum(operations), sum(cost_usd) FROM `{database}`.ai_cost_daily").result_rows
    assert (operations, cost) == (31, Decimal("0.000000213"))

    # a second start: nothing to do, nothing recorded twice, the data unchanged
    assert migrate(chdb_client, database) == []
    assert recorded(chdb_client, database) == expected
    assert chdb_client.query(f"SELECT count() FROM `{database}`.ai_cost_run_keys"
                             ).result_rows == [(1,)]
    assert store.totals()["c2"] == (11, Decimal("0.000000071"))


def test_a_migration_changed_after_it_was_applied_is_refused(
    chdb_client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(RELEASE_0_1, folder)
    database = fresh_database()
    migrate(chdb_client, database, migrations=load_migrations(folder))
    changed = folder / "0002_client_budgets.sql"
    changed.write_text(changed.read_text().replace("ORDER BY client_id",
                                                   "ORDER BY (client_id, period)"))

    with pytest.raises(SchemaMismatchError) as refused:
        migrate(chdb_client, database, migrations=load_migrations(folder))

    message = str(refused.value)
    assert message.startswith(f"Migration 0002_client_budgets.sql has changed since it was "
                              f"applied to database {database} (checksum ")
    assert message.endswith("now); restore the file and make the change in a new migration.")
    assert recorded(chdb_client, database) == [(int(n[:4]), n) for n, _ in
                                               migration_scripts(RELEASE_0_1)]


def test_a_database_migrated_by_a_newer_release_is_refused(
    chdb_client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "newer"
    shutil.copytree(RELEASE_0_1, folder)
    (folder / "0099_future.sql").write_text(
        "ALTER TABLE {database}.ai_cost_tracking ADD COLUMN IF NOT EXISTS later String;\n")
    database = fresh_database()
    migrate(chdb_client, database, migrations=load_migrations(folder))

    with pytest.raises(SchemaMismatchError, match=(
        f"^Database {database} has migration 0099_future.sql applied, which this aipipe does "
        "not ship: a newer release migrated it; run that release or a newer one.$"
    )):
        migrate(chdb_client, database)


def test_every_migration_survives_being_applied_twice(chdb_client: Client) -> None:
    """What two migrators meeting on a server (or one that died half-way) amount to: each
    statement run again after it already took effect, and the version row inserted twice."""
    database = fresh_database()
    layout = Layout(database)
    chdb_client.command(f"CREATE DATABASE `{database}`")
    for migration in load_migrations():
        for _ in range(2):
            for statement in placed(migration.sql, layout):
                chdb_client.command(statement)
    migrate(chdb_client, database, migrations=[])  # creates the version table only
    for migration in load_migrations():
        for _ in range(2):
            _record(chdb_client, layout, migration)

    assert recorded(chdb_client, database) == [(int(n[:4]), n) for n in SHIPPED]
    assert migrate(chdb_client, database) == []
