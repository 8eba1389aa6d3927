"""Replay the completed-operations log into another ClickHouse, verify it, re-price history."""

from aipipe.consumers.replay.pricefile import builtin_price_table, load_price_table
from aipipe.consumers.replay.replay import (
    Manifest,
    Range,
    Replayer,
    ReplayError,
    latest_manifest,
    plan,
)
from aipipe.consumers.replay.reprice import RepriceReport, reprice
from aipipe.consumers.replay.verify import Verdict, verify

__all__ = [
    "Manifest",
    "Range",
    "ReplayError",
    "Replayer",
    "RepriceReport",
    "Verdict",
    "builtin_price_table",
    "latest_manifest",
    "load_price_table",
    "plan",
    "reprice",
    "verify",
]
