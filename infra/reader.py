"""A ClickHouse client for reading, wherever the data lives.

With a server (``http://``) everyone talks to the server. With the embedded engine, a
running pipeline owns the chDB path and serves reads on loopback; when none runs, the
reader opens the path itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from consumers.costs.store import ClickHouseCostStore, open_clickhouse
from infra.processes import wait_for
from infra.queryserver import find_endpoint
from infra.settings import Settings


def endpoint_client(url: str, database: str) -> Any:
    """A clickhouse-connect client on a running pipeline's read endpoint."""
    parsed = urlparse(url)
    return clickhouse_connect.get_client(
        host=parsed.hostname, port=parsed.port, database=database, compress=False
    )


def open_reader(settings: Settings) -> Any:
    if settings.embedded:
        url = find_endpoint(settings.home)
        if url is not None:
            return endpoint_client(url, settings.clickhouse_database)
    return open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database)


def pipeline_store(
    settings: Settings, alive: Callable[[], bool], timeout: float = 120
) -> ClickHouseCostStore:
    """The cost store of a pipeline this process started: never open its chDB path here,
    wait for the pipeline's read endpoint instead (with a server, read the server)."""
    if not settings.embedded:
        return cost_store(settings)
    urls: list[str] = []

    def endpoint_up() -> bool:
        if not alive():
            raise RuntimeError("the pipeline worker exited before its read endpoint was up")
        url = find_endpoint(settings.home)
        urls.extend([url] if url else [])
        return url is not None

    wait_for(endpoint_up, timeout, "the pipeline's read endpoint")
    return ClickHouseCostStore(
        endpoint_client(urls[-1], settings.clickhouse_database), settings.clickhouse_database
    )


def cost_store(settings: Settings) -> ClickHouseCostStore:
    return ClickHouseCostStore(open_reader(settings), settings.clickhouse_database)
