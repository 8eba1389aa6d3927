"""Terminal tables for people (rich): cost summaries and per-client totals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()
if not console.is_terminal:
    console = Console(width=120)  # logs and CI: do not squeeze tables into 80 columns


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        out.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:  # cells as plain text: a client id of "[/]" is data, not markup
        out.add_row(*(Text(str(cell)) for cell in row))
    return out


def print_summary(summary: Any) -> None:
    span = f"{summary.start or 'beginning'} .. {summary.end or 'now'}"
    console.print(
        f"[bold]{escape(summary.client_id)}[/bold]  {span}\n"
        f"total ${summary.total_cost_usd}  operations {summary.operation_count}  "
        f"succeeded {summary.success_count}  failed {summary.failure_count}"
    )
    for title, buckets in (
        ("by operation type", summary.by_operation_type),
        ("by model", summary.by_model),
        ("by day", summary.by_day),
    ):
        console.print(
            table(
                title,
                ["", "operations", "cost USD"],
                ((key, b.count, b.cost_usd) for key, b in sorted(buckets.items())),
            )
        )
