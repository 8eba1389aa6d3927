"""The embedded read endpoint against chDB in-process, measured in the same run.

1. Queries/s of a small per-client summary: ``ClickHouseCostStore.summary`` (what ``aipipe
   costs summary`` asks: one client, one month, ``FINAL``, grouped by type, model, day and
   outcome) through the read endpoint with clickhouse-connect and the endpoint's password
   (the client the CLI and admission use), against the same store on the process's own
   chDB client. Goal: at least 0.5x. Same data for both: ``--endpoint-rows`` cost rows
   made as the analytics bench makes them (100 clients, 90 days), answers checked equal.
   Each side runs ``QUERIES`` summaries per round, best of ``--rounds`` in rotating order.
2. First byte of a large streamed result against its full transfer: ``LARGE_ROWS`` rows
   of TabSeparated (``numbers()`` and their text, about 200 MB) over raw HTTP with basic
   auth; the time to the first body byte, and to the last, best of three.

The endpoint (``aipipe.infra.queryserver.QueryServer``) runs in this process on loopback, over the
bench's chDB client (chDB opens one path per process), with the default limits; its HTTP
threads share this process's GIL with the client, as they share the owner's with the sink.

Standalone: ``python -m tests.bench.endpoint [--rows N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlparse

from clickhouse_connect.driver.client import Client

from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra.endpoint import Endpoint
from aipipe.infra.queryserver import Limits, QueryServer
from aipipe.reader import endpoint_client
from tests.bench.analytics import generate
from tests.bench.report import Figure, Sample, Stopwatch, best_of, compare

Say = Callable[[str], None]
DEFAULT_ROWS = 100_000
QUERIES = 100  # summaries per round and side
LARGE_ROWS = 12_000_000
LARGE = f"SELECT number, toString(number * 7919) FROM numbers({LARGE_ROWS}) FORMAT TabSeparated"
MONTH = (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


def bench_summary(endpoint: Endpoint, local: Client, database: str, rounds: int,
                  say: Say) -> Figure:
    remote = endpoint_client(endpoint, database)
    stores = {"endpoint": ClickHouseCostStore(remote, database),
              "chDB in-process": ClickHouseCostStore(local, database)}
    clients = [f"client-{i}" for i in range(QUERIES)]
    answers = {name: store.summary("client-8", *MONTH) for name, store in stores.items()}
    if answers["endpoint"] != answers["chDB in-process"]:
        raise RuntimeError(f"the endpoint answered {answers['endpoint']}, chDB "
                           f"{answers['chDB in-process']}")

    def side(store: ClickHouseCostStore) -> Callable[[int], Sample]:
        def run(_: int) -> Sample:
            with Stopwatch() as sw:
                for client in clients:
                    store.summary(client, *MONTH)
            return sw.sample(len(clients))
        return run

    samples = best_of(rounds, {name: side(store) for name, store in stores.items()}, say,
                      "queries/s")
    remote.close()
    return compare(
        "per-client summary queries/s: read endpoint (clickhouse-connect, password) vs chDB "
        "in-process", "queries/s", 0.5,
        f"ClickHouseCostStore.summary of one client for one month (FINAL), {QUERIES} clients "
        "per round, sequential; best of the rounds in rotating order; answers checked equal",
        samples["endpoint"], samples["chDB in-process"],
        {"queries_per_round": QUERIES, "answer": str(answers["endpoint"].total_cost_usd)},
    )


def first_byte(endpoint: Endpoint) -> tuple[float, float, int]:
    """Seconds to the first body byte and to the last, and the bytes, of LARGE streamed."""
    url = urlparse(endpoint.url)
    auth = base64.b64encode(f"{endpoint.user}:{endpoint.password}".encode()).decode()
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=300)
    try:
        began = time.perf_counter()
        conn.request("POST", "/", body=LARGE.encode(), headers={"Authorization": f"Basic {auth}"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"the endpoint answered {reply.status}: {reply.read()[:300]!r}")
        size = len(reply.read1(65536))
        first = time.perf_counter() - began
        while chunk := reply.read1(1 << 20):
            size += len(chunk)
        return first, time.perf_counter() - began, size
    finally:
        conn.close()


def bench_first_byte(endpoint: Endpoint, say: Say, rounds: int = 3) -> Figure:
    runs = []
    for r in range(rounds):
        first, full, size = first_byte(endpoint)
        runs.append((first, full, size))
        say(f"    round {r + 1}/{rounds} first byte {first * 1000:,.0f} ms, all {size / 1e6:,.0f}"
            f" MB in {full * 1000:,.0f} ms ({size / 1e6 / full:,.0f} MB/s)")
    firsts, fulls = [f for f, _, _ in runs], [t for _, t, _ in runs]
    size = runs[0][2]
    return Figure(
        f"large streamed result ({LARGE_ROWS / 1e6:g}M rows, {size / 1e6:,.0f} MB TSV): first "
        "byte vs full transfer", "ms", min(firsts) * 1000, min(fulls) * 1000, None,
        f"POST of `{LARGE}` with basic auth over raw HTTP; time to the first body byte vs to "
        f"the last, best of {rounds}",
        rounds_ours=[round(f * 1000, 1) for f in firsts],
        rounds_baseline=[round(t * 1000, 1) for t in fulls],
        notes={"bytes": size, "mb_per_second": round(size / 1e6 / min(fulls), 1)},
    )


def bench_endpoint(client: Client, say: Say, *, rows: int = DEFAULT_ROWS,
                   rounds: int = 5) -> list[Figure]:
    database = f"bench_endpoint_{uuid.uuid4().hex[:8]}"
    say(f"[bold]read endpoint[/bold]: generating {rows:,} cost rows in chDB")
    seconds = generate(client, database, rows)
    say(f"    generated in {seconds:.1f}s; serving them on a loopback endpoint")
    server = QueryServer(client, limits=Limits())
    server.start()
    try:
        say(f"  per-client summary, {QUERIES} per round: endpoint vs chDB in-process")
        figures = [bench_summary(server.endpoint, client, database, rounds, say)]
        say(f"  a large streamed result: {LARGE_ROWS:,} rows of TSV")
        figures.append(bench_first_byte(server.endpoint, say))
    finally:
        server.stop()
        client.command(f"DROP DATABASE IF EXISTS `{database}`")
    return figures


def main(argv: list[str] | None = None) -> int:
    import clickhouse_connect
    from rich.console import Console

    from tests.bench.__main__ import _quiet_logs
    from tests.bench.report import render

    parser = argparse.ArgumentParser(prog="python -m tests.bench.endpoint")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 100))
    _quiet_logs()
    directory = tempfile.mkdtemp(prefix="aipipe-bench-endpoint-")
    began = time.monotonic()
    try:
        client = clickhouse_connect.get_client(dsn=f"chdb://{directory}/chdb")
        figures = bench_endpoint(client, console.print, rows=args.rows, rounds=args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    render(figures, console, title=f"aipipe endpoint bench — {os.cpu_count()} cores, "
                                   f"{time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
