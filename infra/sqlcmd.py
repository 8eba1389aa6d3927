"""``aipipe sql``: one read-only query against the configured ClickHouse, printed for people.

The query runs where the readers' queries run (``infra.reader.open_reader``): the running
pipeline's loopback endpoint for embedded chDB (so it works while the pipeline holds the
path), the chDB path itself when no pipeline runs, or the server. Table names may be left
unqualified: the configured database is the default. Only reads are allowed, checked
here with the read endpoint's own rules before anything is sent, whatever the backend.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlparse

from infra.queryserver import READ_STATEMENTS, QueryError, check_read_only
from infra.settings import Settings
from schemas.errors import AipipeError


class SqlError(AipipeError):
    """A query ``aipipe sql`` refused or ClickHouse failed; one sentence."""


def checked(sql: str) -> str:
    """``sql`` if it is a single read statement; else ``SqlError`` saying why."""
    try:
        fmt = check_read_only(sql)
    except QueryError as exc:
        first = sql.split(None, 1)[0].upper() if sql.split() else ""
        if exc.code == 164 and first not in READ_STATEMENTS:
            raise SqlError(
                f"aipipe sql runs read-only queries (SELECT, WITH, SHOW, DESCRIBE, EXISTS, "
                f"EXPLAIN); {first or 'this'} would change data, so it was not run."
            ) from None
        raise SqlError(f"The query was not run: {exc}") from None
    if fmt is not None:
        raise SqlError(f"Leave out 'FORMAT {fmt}'; choose the output with --format "
                       "(table, csv, tsv, json).")
    return sql


def analyst_client(settings: Settings) -> Any:
    """A client for reading: the pipeline's endpoint or chDB path, or the server as is.

    With a server nothing is migrated, so a read-only login (the ``analyst`` user with the
    ``readonly`` profile, see infra/migrations/ANALYSTS.md) works.
    """
    if settings.embedded:
        from infra.reader import open_reader

        client = open_reader(settings)
    else:
        import clickhouse_connect

        url = urlparse(settings.clickhouse_dsn)
        secure = url.scheme == "https"
        client = clickhouse_connect.get_client(
            host=url.hostname or "localhost", port=url.port or (8443 if secure else 8123),
            username=unquote(url.username) if url.username else "default",
            password=unquote(url.password) if url.password else "", secure=secure,
        )
    client.database = settings.clickhouse_database
    return client


def run_query(settings: Settings, sql: str,
              params: Mapping[str, str]) -> tuple[list[str], list[Sequence[Any]]]:
    client = analyst_client(settings)
    try:
        result = client.query(checked(sql), parameters=dict(params) or None)
    except AipipeError:
        raise
    except Exception as exc:  # clickhouse-connect's errors, with the server's text
        raise SqlError(f"ClickHouse refused the query: {str(exc).strip()}") from exc
    return list(result.column_names), [list(row) for row in result.result_rows]


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def render(columns: list[str], rows: list[Sequence[Any]], fmt: str) -> str:
    """``rows`` as csv, tsv or json (a list of objects); ``table`` is printed by rich."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, map(_plain, row), strict=True)) for row in rows],
                          indent=2)
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _plain(v) for v in row])
    return out.getvalue().rstrip("\n")
