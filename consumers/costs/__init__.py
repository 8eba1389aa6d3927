"""The cost sink's ClickHouse side: rows, migrations, and the cost store (port + adapters)."""

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.migrations import MigrationError, SchemaMismatchError, migrate
from aipipe.consumers.costs.rows import COLUMNS, CostRow, row_from_completed
from aipipe.consumers.costs.store import (
    Bucket,
    ClickHouseCostStore,
    CostStore,
    CostSummary,
    MemoryCostStore,
    StoreError,
)

__all__ = [
    "COLUMNS",
    "Bucket",
    "ClickHouseCostStore",
    "CostRow",
    "CostStore",
    "CostSummary",
    "MemoryCostStore",
    "MigrationError",
    "SchemaMismatchError",
    "StoreError",
    "migrate",
    "open_clickhouse",
    "row_from_completed",
]
