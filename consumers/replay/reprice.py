"""Re-pricing: every cost recomputed from the recorded usage, and the difference it makes.

Pure functions: a row in, a row out. A failed operation costs nothing under any table (as
when it ran); a successful one costs ``table.cost(model, usage)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from aipipe.consumers.costs.rows import CostRow
from aipipe.schemas.events import Usage
from aipipe.schemas.prices import PriceTable


def usage_of(row: CostRow) -> Usage:
    return Usage(
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        image_count=row.image_count,
        video_seconds=row.video_duration_seconds,
    )


def reprice(row: CostRow, table: PriceTable, usage: Usage | None = None) -> CostRow:
    """``row`` with its cost recomputed under ``table`` and ``price_version`` set to it,
    from ``usage`` (the completion's own; the row keeps no image size and quality, by
    which dall-e-3 is priced) or else the row's."""
    cost = table.cost(row.model, usage or usage_of(row)) if row.success else Decimal(0)
    return replace(row, cost_usd=cost, price_version=table.version)


@dataclass
class Line:
    operations: int = 0
    recorded_usd: Decimal = Decimal(0)
    repriced_usd: Decimal = Decimal(0)

    @property
    def difference_usd(self) -> Decimal:
        return self.repriced_usd - self.recorded_usd


@dataclass
class RepriceReport:
    """Recorded against re-priced cost per ``(client_id, model)``, one count per operation.

    Rows are keyed by operation, so a duplicate delivery replaces the earlier copy, as the
    cost table's ``FINAL`` read does.
    """

    price_version: str
    _rows: dict[tuple[str, str, Any], tuple[str, Decimal, Decimal]] = field(
        default_factory=dict)

    def add(self, recorded: CostRow, repriced: CostRow) -> None:
        # by run, as the cost table: an id run again after the dedup horizon counts again
        self._rows[(recorded.client_id, recorded.operation_id, recorded.requested_at)] = (
            recorded.model, recorded.cost_usd, repriced.cost_usd)

    def lines(self) -> dict[tuple[str, str], Line]:
        out: dict[tuple[str, str], Line] = {}
        for (client, _, _), (model, before, after) in self._rows.items():
            line = out.setdefault((client, model), Line())
            line.operations += 1
            line.recorded_usd += before
            line.repriced_usd += after
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        lines = self.lines()
        return {
            "price_version": self.price_version,
            "lines": [
                {"client_id": client, "model": model, "operations": line.operations,
                 "recorded_usd": format(line.recorded_usd, "f"),
                 "repriced_usd": format(line.repriced_usd, "f"),
                 "difference_usd": format(line.difference_usd, "f")}
                for (client, model), line in lines.items()
            ],
            "recorded_usd": format(sum((v.recorded_usd for v in lines.values()), Decimal(0)), "f"),
            "repriced_usd": format(sum((v.repriced_usd for v in lines.values()), Decimal(0)), "f"),
        }
