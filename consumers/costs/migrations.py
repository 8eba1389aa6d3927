"""Versioned, forward-only ClickHouse migrations: ``infra/migrations/NNNN_name.sql``.

Each file is one migration, its version the number in front of its name. The database
keeps the ones it has in ``aipipe_schema_migrations(version, name, checksum,
applied_at)``; ``migrate`` applies the missing ones in order, each once, and records each
after its last statement. It refuses to go on, with one sentence, when

- a migration already applied has changed since (its SHA-256 differs): put the file back
  and make the change in a new migration;
- the database has a migration this code does not know (a newer release migrated it);
- a migration not applied yet is numbered below the latest applied one (forward only).

A database made before this table existed (release 0.1) has none recorded: its files
were all ``IF NOT EXISTS`` and are applied again, harmlessly, then recorded.

Two migrators at once: with chDB it cannot happen, the engine locks its path to one
process. With a server it can (several ``aipipe run costs``, a CLI command), and
ClickHouse has no transactional DDL or lock to take; so every statement of a migration
must be idempotent (``IF NOT EXISTS``, ``ADD COLUMN IF NOT EXISTS`` …) — a migration that
two processes apply together, or that one re-applies after dying half-way, ends the same
— and the version row is inserted with a deduplication token, so it is stored once.
``tests/integration/test_migrations.py`` applies every migration twice to check this.

Whole-line ``--`` comments are dropped and statements split on ``;``, so keep semicolons
out of string literals in those files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import structlog
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from aipipe.consumers.costs.layout import DISTRIBUTED_INSERT_SETTINGS, Layout
from aipipe.consumers.costs.store import StoreError, database_name

log = structlog.get_logger("aipipe.migrations")

VERSION_TABLE = "aipipe_schema_migrations"
_FILE_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")
_VERSION_DDL = f"""CREATE TABLE IF NOT EXISTS {{database}}.{VERSION_TABLE}
(
    version     UInt32,
    name        String,
    checksum    String,
    applied_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version
SETTINGS non_replicated_deduplication_window = 1000"""


class MigrationError(StoreError):
    """A migration could not be applied; the message names the file and statement."""


class SchemaMismatchError(MigrationError):
    """The database's recorded migrations do not fit the files this code ships."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Applied:
    version: int
    name: str
    checksum: str


def _folder() -> Traversable:
    return files("aipipe.infra") / "migrations"


def migration_scripts(folder: Traversable | Path | None = None) -> list[tuple[str, str]]:
    """``(file name, SQL text)`` of every migration, in file-name order."""
    where = folder if folder is not None else _folder()
    scripts = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in where.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(scripts)


def load_migrations(folder: Traversable | Path | None = None) -> list[Migration]:
    """The migrations of ``folder`` (the shipped ones by default), by version."""
    migrations: dict[int, Migration] = {}
    for name, sql in migration_scripts(folder):
        match = _FILE_NAME.match(name)
        if match is None:
            raise MigrationError(
                f"Migration file {name} is not named NNNN_name.sql (four digits, then "
                "lowercase letters, digits and underscores); rename it."
            )
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                f"Migrations {migrations[version].name} and {name} have the same version "
                f"{version:04d}; give the newer one the next free number."
            )
        migrations[version] = Migration(version, name, sql)
    return [migrations[v] for v in sorted(migrations)]


def statements(sql: str, database: str) -> list[str]:
    """The statements of one script, comment lines dropped, ``{database}`` filled in."""
    quoted = f"`{database_name(database)}`"
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [text.strip().replace("{database}", quoted) for text in code.split(";") if text.strip()]


def placed(sql: str, layout: Layout) -> list[str]:
    """The statements of one script as ``layout`` runs them."""
    return [out for statement in statements(sql, layout.database)
            for out in layout.place(statement)]


def pending(known: Sequence[Migration], applied: Iterable[Applied],
            database: str) -> list[Migration]:
    """The migrations still to apply, or ``SchemaMismatchError`` when the database and the
    files disagree (pure: the decision, apart from reading and applying)."""
    by_version = {m.version: m for m in known}
    done = {a.version: a for a in applied}
    for version, record in sorted(done.items()):
        migration = by_version.get(version)
        if migration is None:
            raise SchemaMismatchError(
                f"Database {database} has migration {record.name} applied, which this aipipe "
                "does not ship: a newer release migrated it; run that release or a newer one."
            )
        if migration.checksum != record.checksum:
            raise SchemaMismatchError(
                f"Migration {migration.name} has changed since it was applied to database "
                f"{database} (checksum {record.checksum[:12]} then, {migration.checksum[:12]} "
                "now); restore the file and make the change in a new migration."
            )
    todo = [m for m in known if m.version not in done]
    if done and todo and todo[0].version < max(done):
        latest = done[max(done)].name
        raise SchemaMismatchError(
            f"Migration {todo[0].name} is numbered below {latest}, already applied to "
            f"database {database}; migrations only go forward, so renumber it after {latest}."
        )
    return todo


def applied_migrations(client: Client, layout: Layout) -> list[Applied]:
    """What the database has recorded (its version table is created when missing)."""
    _run(client, "the version table", placed(_VERSION_DDL, layout))
    sql = (f"SELECT version, argMax(name, applied_at), argMax(checksum, applied_at) "
           f"FROM {layout.quoted}.{VERSION_TABLE} GROUP BY version ORDER BY version")
    try:
        rows = client.query(sql).result_rows
    except ClickHouseError as exc:
        raise MigrationError(f"Reading {VERSION_TABLE} failed: {exc}") from exc
    return [Applied(int(v), str(n), str(c)) for v, n, c in rows]


def migrate(client: Client, database: str, cluster: str = "",
            migrations: Sequence[Migration] | None = None) -> list[Migration]:
    """Bring ``database`` up to the shipped schema (or ``migrations``); returns what it
    applied. Safe to run any number of times, and from two processes at once."""
    layout = Layout(database, cluster)
    known = load_migrations() if migrations is None else list(migrations)
    _run(client, "the database", placed("CREATE DATABASE IF NOT EXISTS {database}", layout))
    todo = pending(known, applied_migrations(client, layout), database)
    for migration in todo:
        _run(client, migration.name, placed(migration.sql, layout))
        _record(client, layout, migration)
        log.info("schema_migrated", database=database, version=migration.version,
                 migration=migration.name)
    return todo


def _run(client: Client, name: str, sqls: Sequence[str]) -> None:
    for statement in sqls:
        try:
            client.command(statement)
        except ClickHouseError as exc:
            first_line = statement.splitlines()[0]
            raise MigrationError(f"Migration {name} failed at '{first_line}': {exc}") from exc


def _record(client: Client, layout: Layout, migration: Migration) -> None:
    try:
        client.insert(
            VERSION_TABLE,
            [[migration.version, migration.name, migration.checksum]],
            column_names=["version", "name", "checksum"],
            database=layout.database,
            settings={
                "insert_deduplication_token":
                    f"aipipe-migration-{migration.version}-{migration.checksum}",
                **(DISTRIBUTED_INSERT_SETTINGS if layout.cluster else {}),
            },
        )
    except ClickHouseError as exc:
        raise MigrationError(f"Recording migration {migration.name} failed: {exc}") from exc
