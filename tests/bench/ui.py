"""The cost page's first render over the analytics bench's 10M cost rows.

Runs on the database ``tests.bench.analytics`` generated (its rows span 2026-09-01 to
2026-11-29, 100 clients, merged and sealed as the pipeline would leave them), served as
the pipeline serves chDB: this process owns the path and runs the read endpoint
(``QueryServer``), and ``aipipe ui --port 0`` runs in its own process, reading through
that endpoint with the analysts' credentials. Debian's headless Chromium, driven by
Playwright, opens the page for one month (2026-10-01 to 2026-10-31):

- **first render**: from ``page.goto`` to the page having drawn its first answer
  (``body[data-loads]`` is set), in a browser and a UI process that have served
  nothing before;
- **render**: the same after a reload, median of ``rounds``; and with a client filter.

The baseline is the same questions asked in this process: ``CostReader.summary`` on the
chDB client itself (no endpoint, no HTTP, no browser), median of ``rounds``. The page's
total is checked against it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

from clickhouse_connect.driver.client import Client

from aipipe.infra.queryserver import QueryServer
from aipipe.ui import CostReader, parse_query
from tests.bench.report import Figure
from tests.bench.settings import bench_settings
from tests.e2e.test_ui import running_ui  # `aipipe ui --port 0` in its own process

CHROMIUM = "/usr/bin/chromium"
RANGE = {"from": "2026-10-01", "to": "2026-10-31"}
CLIENT = "client-7"
Say = Callable[[str], None]


def in_process_seconds(client: Client, database: str, args: dict[str, str],
                       rounds: int) -> tuple[float, Decimal]:
    """Median seconds of the page's questions asked of chDB here; the total they give."""
    reader = CostReader(lambda: contextlib.nullcontext(client), database, bench_settings())
    query = parse_query(args, date(2026, 11, 30))
    times, total = [], Decimal(0)
    for _ in range(rounds):
        began = time.perf_counter()
        answer = reader.summary(query, datetime.now(UTC))
        times.append(time.perf_counter() - began)
        total = Decimal(answer["total_usd"])
    return statistics.median(times), total


def bench_ui(client: Client, database: str, rows: int, say: Say, rounds: int = 5) -> list[Figure]:
    from playwright.sync_api import Page, sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError("chromium is missing: run `make tools`")
    say(f"[bold]ui[/bold]: the cost page over {rows / 1e6:g}M rows, one month, in Chromium")
    baseline, total = in_process_seconds(client, database, RANGE, rounds)
    baseline_client, _ = in_process_seconds(client, database, {**RANGE, "client": CLIENT},
                                            rounds)
    say(f"    in process: {baseline * 1000:,.0f} ms all clients, {baseline_client * 1000:,.0f} "
        f"ms one client (median of {rounds})")
    home = Path(tempfile.mkdtemp(prefix="aipipe-bench-ui-"))

    def render(page: Page, url: str) -> float:
        began = time.perf_counter()
        page.goto(url)
        # a selector, not wait_for_function: the page's CSP forbids evaluating strings
        page.locator("body[data-loads]").wait_for(state="attached", timeout=300_000)
        seconds = time.perf_counter() - began
        if page.locator("#error").is_visible():
            raise AssertionError(f"the page shows an error: {page.locator('#error').inner_text()}")
        return seconds

    with QueryServer(client, home=home) as owner:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
        env.update({"AIPIPE_HOME": str(home), "AIPIPE_CLICKHOUSE_DATABASE": database,
                    "AIPIPE_CLICKHOUSE_URL": f"chdb://{owner.engine.path}"})
        with running_ui(env) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                month = f"{url}?from={RANGE['from']}&to={RANGE['to']}"
                first = render(page, month)
                shown = Decimal(page.locator("#total-usd").inner_text()[1:].replace(",", ""))
                if shown != total:
                    raise AssertionError(f"the page shows ${shown}, the database ${total}")
                again = [render(page, month) for _ in range(rounds)]
                one = [render(page, f"{month}&client={CLIENT}") for _ in range(rounds)]
            finally:
                browser.close()
    warm, single = statistics.median(again), statistics.median(one)
    say(f"    first render {first * 1000:,.0f} ms; reload {warm * 1000:,.0f} ms; one client "
        f"{single * 1000:,.0f} ms (medians of {rounds})")
    method = (f"`aipipe ui` over {rows / 1e6:g}M cost rows (the analytics bench's database: "
              "100 clients, 90 days, merged and sealed) served from chDB through the "
              "pipeline's read endpoint; headless Chromium (Playwright) opens one month "
              f"({RANGE['from']} to {RANGE['to']}); from goto to the first answer drawn; "
              "baseline: the same questions (CostReader.summary) on chDB in-process, "
              "median; the ratio is how many times longer the page takes")
    notes = {"rows": rows, "rounds": rounds, "reload_ms": [round(s * 1000) for s in again],
             "one_client_ms": [round(s * 1000) for s in one],
             "in_process_one_client_ms": round(baseline_client * 1000)}
    return [
        Figure(f"UI first render, {rows / 1e6:g}M rows, one month, all clients", "ms",
               first * 1000, baseline * 1000, None, method, notes=notes),
        Figure(f"UI render after reload, {rows / 1e6:g}M rows, one month", "ms",
               warm * 1000, baseline * 1000, None, method + "; median of reloads",
               notes=notes),
        Figure(f"UI render, {rows / 1e6:g}M rows, one month, one client", "ms",
               single * 1000, baseline_client * 1000, None,
               method + f"; ?client={CLIENT}, median", notes=notes),
    ]
