"""Open the cost database: chDB on a path or a ClickHouse server, migrated before use.

Beside the store (``store.py``) rather than in it: the migrations and the cluster layout
raise the store's errors, and opening a database migrates it.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from aipipe.consumers.costs.layout import DISTRIBUTED_INSERT_SETTINGS
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.store import StoreError


def _open_chdb(path: Path, patience: float = 15.0) -> Client:
    """Open the embedded engine, waiting out a short-lived holder of the path (a CLI read)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")
        except ClickHouseError as exc:
            if "Cannot lock file" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # start-up only: another process holds the path for a moment


def open_clickhouse(dsn: str, database: str, cluster: str = "") -> Client:
    """A migrated client for ``chdb:///path`` (embedded) or ``http(s)://user:pass@host:port``.

    Table names are qualified with ``database`` everywhere, so the client has no default
    database (it may not exist before the migration creates it). With ``cluster`` (a
    server's cluster name) the tables are laid out on it (``layout.py``) and every insert
    through the client waits until the shards have its rows.
    """
    url = urlparse(dsn)
    try:
        if url.scheme == "chdb":
            if cluster:
                raise StoreError(
                    f"ClickHouse cluster {cluster!r} needs a server URL, not chDB; set "
                    "AIPIPE_CLICKHOUSE_URL=http(s)://user:password@host:8123 or unset "
                    "AIPIPE_CLICKHOUSE_CLUSTER."
                )
            path = Path(url.netloc + url.path).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            client = _open_chdb(path)
        elif url.scheme in ("http", "https"):
            secure = url.scheme == "https"
            client = clickhouse_connect.get_client(
                host=url.hostname or "localhost",
                port=url.port or (8443 if secure else 8123),
                username=unquote(url.username) if url.username else "default",
                password=unquote(url.password) if url.password else "",
                secure=secure,
                settings=DISTRIBUTED_INSERT_SETTINGS if cluster else None,
            )
        else:
            raise StoreError(
                f"ClickHouse URL {dsn!r} has scheme {url.scheme!r}; use chdb:///path or "
                "http(s)://user:password@host:port (AIPIPE_CLICKHOUSE_URL)."
            )
        migrate(client, database, cluster)
    except ClickHouseError as exc:
        raise StoreError(f"ClickHouse could not connect to {url.scheme}://{url.hostname or ''}"
                         f"{url.path}: {exc}") from exc
    return client
