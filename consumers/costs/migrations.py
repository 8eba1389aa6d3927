"""Apply the ClickHouse DDL shipped in ``infra/migrations`` (``NNNN_name.sql``), in order.

Every statement is idempotent (``IF NOT EXISTS``), so migrating on each start is safe
and needs no bookkeeping table. Whole-line ``--`` comments are dropped and statements
split on ``;``, so keep semicolons out of string literals in those files.
"""

from __future__ import annotations

from importlib.resources import files

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from aipipe.consumers.costs.store import StoreError, database_name


class MigrationError(StoreError):
    """A migration could not be applied; the message names the file and statement."""


def migration_scripts() -> list[tuple[str, str]]:
    """``(file name, SQL text)`` of every migration, in file-name order."""
    folder = files("infra") / "migrations"
    scripts = [
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(scripts)


def statements(sql: str, database: str) -> list[str]:
    """The statements of one script, comment lines dropped, ``{database}`` filled in."""
    quoted = f"`{database_name(database)}`"
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [text.strip().replace("{database}", quoted) for text in code.split(";") if text.strip()]


def migrate(client: Client, database: str) -> None:
    """Bring ``database`` up to the current schema; safe to run any number of times."""
    for name, sql in migration_scripts():
        for statement in statements(sql, database):
            try:
                client.command(statement)
            except ClickHouseError as exc:
                first_line = statement.splitlines()[0]
                raise MigrationError(f"Migration {name} failed at '{first_line}': {exc}") from exc
