"""``aipipe report``: a cost report (HTML, and PNG) from the analyst tables.

Four plots a person reads at a glance: spend per day by model, by client and by operation
type (stacked bars, from ``ai_cost_daily_between``), and rejected requests by reason (from
``events_archive``). The numbers behind each plot are in the HTML as tables and as JSON
(``<script id="aipipe-report-data">``), and in the PNG's ``aipipe-report-data`` text
chunk, so what was drawn can be checked without looking at pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from aipipe.consumers.costs.store import database_name

Series = dict[str, dict[str, str]]  # name -> day (ISO) -> USD (exact, as text)


@dataclass
class ReportData:
    start: str
    end: str
    days: list[str] = field(default_factory=list)
    by_model: Series = field(default_factory=dict)
    by_client: Series = field(default_factory=dict)
    by_operation_type: Series = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    total_usd: str = "0"
    operations: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _series(rows: list[tuple[Any, ...]]) -> Series:
    out: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for day, name, cost in rows:
        out[str(name)][_iso(day)] += Decimal(cost)
    return {name: {d: format(v, "f") for d, v in sorted(days.items())}
            for name, days in sorted(out.items())}


def _iso(day: Any) -> str:
    return day.isoformat() if isinstance(day, date) else str(day)


def report_data(client: Any, database: str, start: datetime, end: datetime) -> ReportData:
    """The numbers of the report: days ``[start, end)`` (of ``requested_at``), UTC."""
    db = f"`{database_name(database)}`"
    params = {"start": start.date().isoformat(), "end": end.date().isoformat(),
              "t0": start.strftime("%Y-%m-%d %H:%M:%S"), "t1": end.strftime("%Y-%m-%d %H:%M:%S")}
    daily = f"{db}.ai_cost_daily_between(start = {{start:Date}}, end = {{end:Date}})"

    def query(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in client.query(sql, parameters=params).result_rows]

    data = ReportData(start=start.isoformat(), end=end.isoformat())
    for attribute, column in (("by_model", "model"), ("by_client", "client_id"),
                              ("by_operation_type", "operation_type")):
        setattr(data, attribute, _series(query(
            f"SELECT day, {column}, sum(cost_usd) FROM {daily} "
            f"GROUP BY day, {column} ORDER BY day, {column}")))
    data.days = sorted({d for s in data.by_model.values() for d in s})
    data.rejections = {str(reason): int(n) for reason, n in query(
        f"SELECT JSONExtractString(payload, 'reason') AS reason, count() FROM {db}.events_archive "
        "FINAL WHERE event_type = 'operation.rejected' "
        "AND occurred_at >= {t0:DateTime64(3, 'UTC')} AND occurred_at < {t1:DateTime64(3, 'UTC')} "
        "GROUP BY reason ORDER BY reason")}
    totals = query(f"SELECT sum(cost_usd), sum(operations) FROM {daily}")
    data.total_usd = format(Decimal(totals[0][0] or 0), "f")
    data.operations = int(totals[0][1] or 0)
    return data


def render_png(data: ReportData) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    figure.suptitle(f"aipipe costs {data.start[:10]} .. {data.end[:10]}: ${data.total_usd}, "
                    f"{data.operations} operations")
    for ax, title, series in (
        (axes[0][0], "Spend per day by model (USD)", data.by_model),
        (axes[0][1], "Spend per day by client (USD)", data.by_client),
        (axes[1][0], "Spend per day by operation type (USD)", data.by_operation_type),
    ):
        ax.set_title(title)
        if not series:
            say_none(ax)
            continue
        bottom = [0.0] * len(data.days)
        for name, values in series.items():
            heights = [float(values.get(day, 0)) for day in data.days]
            ax.bar(data.days, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.tick_params(axis="x", labelrotation=45)
        ax.legend(fontsize="small")
    ax = axes[1][1]
    ax.set_title("Rejected requests by reason")
    if data.rejections:
        ax.bar(list(data.rejections), list(data.rejections.values()), color="tab:red")
        ax.yaxis.get_major_locator().set_params(integer=True)
    else:
        say_none(ax)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90,
                   metadata={"Title": "aipipe cost report",
                             "aipipe-report-data": json.dumps(data.to_json())})
    plt.close(figure)
    return buffer.getvalue()


def say_none(ax: Any) -> None:
    """An empty panel: the word "none" in place of empty axes."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize="x-large", color="0.4",
            transform=ax.transAxes)


def _table(title: str, series: Series, days: list[str]) -> str:
    if not series:
        return f"<h2>{html.escape(title)}</h2><p>none</p>"
    head = "".join(f"<th>{html.escape(d)}</th>" for d in days)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{html.escape(values.get(d, ''))}</td>" for d in days) + "</tr>"
        for name, values in series.items())
    return (f"<h2>{html.escape(title)}</h2><table><tr><th></th>{head}</tr>{body}</table>")


def render_html(data: ReportData, png: bytes) -> str:
    image = base64.b64encode(png).decode()
    rejections = "".join(f"<tr><th>{html.escape(r)}</th><td>{n}</td></tr>"
                         for r, n in data.rejections.items())
    rejection_table = f"<table>{rejections}</table>" if rejections else "<p>none</p>"
    payload = json.dumps(data.to_json()).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>aipipe cost report {html.escape(data.start[:10])} .. {html.escape(data.end[:10])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style>
</head><body>
<h1>aipipe cost report</h1>
<p>{html.escape(data.start)} .. {html.escape(data.end)} (days of the request, UTC):
total ${html.escape(data.total_usd)} over {data.operations} operations.</p>
<img id="plots" alt="spend per day by model, client and operation type; rejections by reason"
 src="data:image/png;base64,{image}">
{_table("Spend per day by model (USD)", data.by_model, data.days)}
{_table("Spend per day by client (USD)", data.by_client, data.days)}
{_table("Spend per day by operation type (USD)", data.by_operation_type, data.days)}
<h2>Rejected requests by reason</h2>{rejection_table}
<script type="application/json" id="aipipe-report-data">{payload}</script>
</body></html>
"""


def write_report(client: Any, database: str, start: datetime, end: datetime, out: Path,
                 png_path: Path | None = None) -> ReportData:
    data = report_data(client, database, start, end)
    png = render_png(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data, png), encoding="utf-8")
    if png_path is not None:
        png_path.write_bytes(png)
    return data
