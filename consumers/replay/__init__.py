"""Replay the completed-operations log into another ClickHouse, verify it, re-price history."""

from consumers.replay.pricefile import builtin_price_table, load_price_table
from consumers.replay.replay import Manifest, Range, Replayer, ReplayError, latest_manifest, plan
from consumers.replay.reprice import RepriceReport, reprice
from consumers.replay.verify import Verdict, verify

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
