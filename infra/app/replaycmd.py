"""What ``aipipe replay`` and ``replay verify`` do, between the CLI and
``aipipe.consumers.replay``."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.consumers.replay import (
    Manifest,
    Replayer,
    ReplayError,
    Verdict,
    builtin_price_table,
    latest_manifest,
    load_price_table,
    plan,
    verify,
)
from aipipe.consumers.replay.asof import budget_report_as_of
from aipipe.consumers.replay.replay import replay_consumer
from aipipe.infra.endpoint import find_endpoint
from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.settings import Settings
from aipipe.reader import open_reader
from aipipe.schemas.prices import PriceTable
from aipipe.tables import console, table


def _same_place(a: str, b: str) -> bool:
    ua, ub = urlparse(a), urlparse(b)
    if ua.scheme == ub.scheme == "chdb":
        return Path(ua.netloc + ua.path).resolve() == Path(ub.netloc + ub.path).resolve()
    return (ua.scheme, ua.hostname, ua.port) == (ub.scheme, ub.hostname, ub.port)


def check_target(settings: Settings, into: str, database: str) -> None:
    if urlparse(into).scheme not in ("chdb", "http", "https"):
        raise ReplayError(f"--into {into!r} is not a ClickHouse URL; use chdb:///fresh/path or "
                          "http(s)://user:password@host:8123 with --database NAME.")
    if _same_place(into, settings.clickhouse_dsn) and database == settings.clickhouse_database:
        raise ReplayError(
            f"--into {into} with database {database} is the live projection; replay into a "
            "fresh chDB path or another database (--database NAME)."
        )


def prices_for(price_table: Path | None, price_version: str | None) -> PriceTable | None:
    if price_table is not None and price_version is not None:
        raise ReplayError("Give --price-table or --price-version, not both.")
    if price_table is not None:
        return load_price_table(price_table)
    if price_version is not None:
        return builtin_price_table(price_version)
    return None


class Progress:
    """One line on stderr at most every second: events read of the planned total, rate."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.began = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self.last < 1.0 and done < total and done):
            return
        self.last = now
        rate = done / (now - self.began) if now > self.began else 0.0
        percent = 100 * done / total if total else 100.0
        print(f"replay: {done:,}/{total:,} events ({percent:.0f}%), {rate:,.0f} events/s",
              file=sys.stderr, flush=True)


def run_replay(settings: Settings, *, into: str, database: str, start: datetime | None,
               end: datetime | None, prices: PriceTable | None, batch_rows: int,
               quiet: bool = False) -> Manifest:
    check_target(settings, into, database)
    client = open_clickhouse(into, database)
    store = ClickHouseCostStore(client, database)
    existing = client.query(f"SELECT count() FROM `{database}`.ai_cost_tracking").result_rows
    if existing[0][0]:
        raise ReplayError(
            f"{into} database {database} already holds {existing[0][0]} cost rows; replay into "
            "a fresh chDB path or an empty database so the manifest describes all of it."
        )
    consumer = replay_consumer(settings.kafka_bootstrap, **kafka_config(settings))
    topic = settings.topics.completed
    ranges = plan(consumer, topic, start, end)
    replayer = Replayer(consumer, store, batch_rows=batch_rows, prices=prices,
                        progress=Progress(quiet))
    return replayer.run(topic, ranges, start, end)


def run_verify(settings: Settings, *, into: str, database: str) -> tuple[Manifest, Verdict]:
    if settings.embedded and urlparse(into).scheme == "chdb" and find_endpoint(
            settings.home) is None:
        raise ReplayError(
            "The live projection is in embedded chDB and no pipeline serves it; chDB opens one "
            "path per process, so start the pipeline (aipipe run) and verify again."
        )
    rebuilt = open_clickhouse(into, database)
    manifest = latest_manifest(rebuilt, database)
    if manifest is None:
        raise ReplayError(f"{into} database {database} has no replay manifest; run aipipe "
                          "replay --into it first.")
    live: Any = open_reader(settings)
    return manifest, verify(live, settings.clickhouse_database, rebuilt, database, manifest)


def print_manifest(manifest: Manifest) -> None:
    console.print(
        f"[bold]replay {manifest.replay_id}[/bold] of {manifest.topic} into database "
        f"{manifest.database}: {manifest.events:,} events, {manifest.rows:,} rows written, "
        f"{manifest.skipped} skipped, {manifest.seconds:.1f} s "
        f"({manifest.rows_per_second:,.0f} events/s); prices {manifest.price_version}"
        f" (recorded: {', '.join(manifest.recorded_price_versions) or 'none'})",
        highlight=False,
    )
    console.print(table("offsets read [start, end)", ["partition", "start", "end", "events"],
                        ((r.partition, r.start, r.end, r.size) for r in manifest.ranges)))
    if manifest.reprice is not None:
        rp = manifest.reprice
        console.print(table(
            f"re-priced with {rp['price_version']}",
            ["client", "model", "operations", "recorded USD", "re-priced USD", "difference USD"],
            ((line["client_id"], line["model"], line["operations"], line["recorded_usd"],
              line["repriced_usd"], line["difference_usd"]) for line in rp["lines"]),
        ))
        console.print(f"total recorded ${rp['recorded_usd']}, re-priced ${rp['repriced_usd']}",
                      highlight=False)


def print_verdict(manifest: Manifest, verdict: Verdict) -> None:
    live, rebuilt = verdict.live, verdict.rebuilt
    if verdict.matches:
        console.print(
            f"The rebuilt projection matches the live one exactly: {live['operations']} "
            f"operations, ${live['cost_usd']}, {live['clients']} clients, {verdict.buckets} "
            f"client-days (replay {manifest.replay_id}, offsets {_ranges(manifest)}).",
            highlight=False, soft_wrap=True, markup=False,
        )
        return
    console.print(
        f"The rebuilt projection differs from the live one in {len(verdict.differences)} "
        f"places: live {live['operations']} operations ${live['cost_usd']}, rebuilt "
        f"{rebuilt['operations']} operations ${rebuilt['cost_usd']} (replay "
        f"{manifest.replay_id}, offsets {_ranges(manifest)}).",
        highlight=False, soft_wrap=True, markup=False,
    )
    for difference in verdict.differences:  # (client ids: data, not markup)
        console.print(f"  {difference}", highlight=False, soft_wrap=True, markup=False)


def _ranges(manifest: Manifest) -> str:
    return ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in manifest.ranges)


def budget_report_at(settings: Settings, client_id: str, as_of: datetime,
                     override: Decimal | None) -> dict[str, Any]:
    """``aipipe budget check --as-of T``: see ``aipipe.consumers.replay.asof``."""
    consumer = replay_consumer(settings.kafka_bootstrap, **kafka_config(settings))
    try:
        ranges = plan(consumer, settings.topics.completed, None, as_of)
    finally:
        consumer.close()
    return budget_report_as_of(open_reader(settings), settings.clickhouse_database,
                               settings.topics.completed, ranges, client_id, as_of,
                               settings.budget_usd, settings.budget_period, override)
