"""``aipipe sql``: one read-only query against the configured ClickHouse, printed for people.

Embedded, the query runs where the readers' queries run: the running pipeline's loopback
endpoint when it serves the configured chDB path, else the path itself, opened here and
served to this command by the same endpoint code on an ephemeral loopback port, so the
same rules apply either way: read-only as ClickHouse's own parser decides
(``aipipe.infra.readonly``), the same limits. With a server, the server's read-only user
decides. Table names may be left unqualified: the configured database is the default.
``checked`` asks the engine before anything is opened, for a clear sentence.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlparse

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.infra.queryserver import Limits, QueryServer
from aipipe.infra.readonly import READONLY, Classifier, QueryError
from aipipe.infra.settings import Settings
from aipipe.reader import endpoint_client, open_reader, serving_endpoint
from aipipe.schemas.errors import AipipeError

READ_KINDS = "SELECT, WITH, SHOW, DESCRIBE, EXISTS, EXPLAIN"
_OPEN_PATH = re.compile(r"already initialized with path '([^']*)'")


class SqlError(AipipeError):
    """A query ``aipipe sql`` refused or ClickHouse failed; one sentence."""


def _engine_connection() -> Any:
    """A read-only chDB connection to this process's engine (in memory if none is open)."""
    import chdb

    try:
        return chdb.connect(":memory:?readonly=1")
    except Exception as exc:  # this process already runs the engine on a path: use it
        found = _OPEN_PATH.search(str(exc))
        if found is None:
            raise
        return chdb.connect(
            f"file:{found.group(1)}?readonly=1")


def _sentence(exc: QueryError) -> SqlError:
    text = str(exc)
    kind = re.search(r"Cannot execute (.+?) query in readonly mode", text)
    if exc.code == READONLY and kind:
        return SqlError(f"aipipe sql runs read-only queries ({READ_KINDS}); {kind.group(1)} "
                        "would change data, so it was not run.")
    return SqlError(f"The query was not run: {text}")


def checked(sql: str) -> str:
    """``sql`` if ClickHouse's parser finds one read statement without FORMAT; else
    ``SqlError`` saying why."""
    conn = _engine_connection()
    try:
        verdict = Classifier(conn).classify(sql)
    except QueryError as exc:
        raise _sentence(exc) from None
    finally:
        conn.close()
    if verdict.format is not None:
        raise SqlError(f"Leave out 'FORMAT {verdict.format}'; choose the output with --format "
                       "(table, csv, tsv, json).")
    return sql


@contextlib.contextmanager
def _own_endpoint(settings: Settings) -> Iterator[Any]:
    """The configured chDB path, opened here and served to this process on loopback."""
    owner = open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)
    server = QueryServer(owner, limits=Limits.from_settings(settings))
    server.start()
    try:
        yield endpoint_client(server.endpoint, settings.clickhouse_database)
    finally:
        server.stop()
        owner.close()


@contextlib.contextmanager
def analyst_session(settings: Settings) -> Iterator[Any]:
    """A client for reading: the pipeline's endpoint, this process's own endpoint on the
    chDB path, or the server as is (its read-only user decides)."""
    if settings.embedded:
        endpoint = serving_endpoint(settings)
        if endpoint is None:
            with _own_endpoint(settings) as client:
                yield client
            return
        yield endpoint_client(endpoint, settings.clickhouse_database)
        return
    yield analyst_client(settings)


def analyst_client(settings: Settings) -> Any:
    """A client for reading: the pipeline's endpoint or chDB path, or the server as is.

    With a server nothing is migrated, so a read-only login (the ``analyst`` user with the
    ``readonly`` profile, see infra/migrations/ANALYSTS.md) works.
    """
    if settings.embedded:
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
    with analyst_session(settings) as client:
        try:
            result = client.query(sql, parameters=dict(params) or None)
        except AipipeError:
            raise
        except Exception as exc:  # clickhouse-connect's errors, with the server's text
            message = str(exc).strip()
            code = re.search(r"Code: (\d+)\.", message)
            if code and int(code.group(1)) == READONLY:
                raise _sentence(QueryError(READONLY, message)) from exc
            raise SqlError(f"ClickHouse refused the query: {message}") from exc
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
