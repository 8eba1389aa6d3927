"""A ClickHouse client for reading, wherever the data lives.

With a server (``http://``) everyone talks to the server. With the embedded engine, a
running pipeline owns the chDB path and serves reads on loopback; when none runs, the
reader opens the path itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from consumers.costs.store import ClickHouseCostStore, open_clickhouse
from infra.queryserver import find_endpoint
from infra.settings import Settings


def open_reader(settings: Settings) -> Any:
    if settings.embedded:
        url = find_endpoint(settings.home)
        if url is not None:
            parsed = urlparse(url)
            return clickhouse_connect.get_client(
                host=parsed.hostname,
                port=parsed.port,
                database=settings.clickhouse_database,
                compress=False,
            )
    return open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)


def cost_store(settings: Settings) -> ClickHouseCostStore:
    return ClickHouseCostStore(open_reader(settings), settings.clickhouse_database)
