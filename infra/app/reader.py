"""A ClickHouse client for reading, wherever the data lives.

With a server (``http://``) everyone talks to the server. With the embedded engine, a
running pipeline owns the chDB path and serves reads on loopback, with the user and
password it publishes in ``$AIPIPE_HOME/query-endpoint.json``; when none runs, the reader
opens the path itself. A reader reads the path its URL names: the home's endpoint is used
only when it serves that very path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect

from aipipe.consumers.costs.budgets import BudgetStore
from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.store import ClickHouseCostStore, StoreError
from aipipe.infra.endpoint import (
    ADMISSION_KEY_HEADER,
    ADMISSION_QUOTA_KEY,
    Endpoint,
    read_endpoint,
    refuse_other_path,
)
from aipipe.infra.settings import Settings
from aipipe.processes import wait_for


def endpoint_client(endpoint: Endpoint, database: str, **options: Any) -> Any:
    """A clickhouse-connect client on a running pipeline's read endpoint."""
    parsed = urlparse(endpoint.url)
    return clickhouse_connect.get_client(
        host=parsed.hostname, port=parsed.port, username=endpoint.user,
        password=endpoint.password, database=database, compress=False, **options)


def serving_endpoint(settings: Settings) -> Endpoint | None:
    """The home's read endpoint if it runs and serves the chDB path the settings name."""
    endpoint = read_endpoint(settings.home)
    if endpoint is None or not endpoint.serves(settings.chdb_path):
        return None
    return endpoint


def open_reader(settings: Settings) -> Any:
    if settings.embedded:
        endpoint = serving_endpoint(settings)
        if endpoint is not None:
            return endpoint_client(endpoint, settings.clickhouse_database)
    return open_clickhouse(settings.clickhouse_dsn, settings.clickhouse_database,
                           settings.clickhouse_cluster)


def pipeline_store(
    settings: Settings, alive: Callable[[], bool], timeout: float = 120
) -> ClickHouseCostStore:
    """The cost store of a pipeline this process started: never open its chDB path here,
    wait for the pipeline's read endpoint instead (with a server, read the server)."""
    if not settings.embedded:
        return cost_store(settings)
    found: list[Endpoint] = []

    def endpoint_up() -> bool:
        if not alive():
            raise RuntimeError("the pipeline worker exited before its read endpoint was up")
        endpoint = read_endpoint(settings.home)
        if endpoint is not None and not endpoint.serves(settings.chdb_path):
            raise StoreError(refuse_other_path(endpoint, settings.chdb_path))
        found.extend([endpoint] if endpoint else [])
        return endpoint is not None

    wait_for(endpoint_up, timeout, "the pipeline's read endpoint")
    return ClickHouseCostStore(
        endpoint_client(found[-1], settings.clickhouse_database), settings.clickhouse_database
    )


def cost_store(settings: Settings) -> ClickHouseCostStore:
    return ClickHouseCostStore(open_reader(settings), settings.clickhouse_database)


def budget_store_opener(settings: Settings) -> Callable[[], BudgetStore | None]:
    """Open a read-only store: the server, or the owner's loopback endpoint (never chDB).

    Embedded, the endpoint must serve the chDB path the settings name (else: no store, and
    admission keeps its last answers). Lookups run in the endpoint's admission slots
    (``quota_key``) and wait at most a few seconds, so an analyst's long query never holds
    up admission: on a timeout the budget gate keeps the last known spend.
    """

    def open_store() -> BudgetStore | None:
        if settings.embedded:
            endpoint = serving_endpoint(settings)
            if endpoint is None:
                return None
            client = endpoint_client(
                endpoint, settings.clickhouse_database, send_receive_timeout=5,
                settings={"quota_key": ADMISSION_QUOTA_KEY},
                headers={ADMISSION_KEY_HEADER: endpoint.admission_key})
        else:
            client = open_reader(settings)
        return BudgetStore(client, settings.clickhouse_database)

    return open_store
