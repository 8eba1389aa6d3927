"""Replay from the Kafka log into a fresh chDB path, verify, and re-price: real processes.

The live projection is owned by a real ``aipipe run costs`` worker (killed once with
SIGKILL between insert and commit, then restarted) and fed duplicates; ``aipipe replay``
and ``aipipe replay verify`` run as subprocesses (chDB opens one path per process: the
replay target is theirs, the live one the worker's, read through its endpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationCompleted, Usage
from aipipe.schemas.prices import PRICE_TABLES
from tests.e2e.test_unreadable_headers import BAD_HEADER, kcat
from tests.e2e.test_unreadable_headers import completed as unreadable_completed
from tests.support.pipeline import produce, store_of, wait_recorded

pytestmark = pytest.mark.e2e
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SHAPES = (
    ("image_generation", "gemini-2.5-flash-image",
     lambda n: Usage(input_tokens=20 + n, output_tokens=1290 * (n % 3 + 1), image_count=n % 3 + 1)),
    ("text_generation", "gemini-2.5-flash",
     lambda n: Usage(input_tokens=300 + n, output_tokens=100 + 7 * n)),
    ("video_generation", "veo-3.0-generate-001", lambda n: Usage(video_seconds=Decimal(4 + n % 5))),
    ("image_generation", "gemini-2.5-flash-image",
     lambda n: Usage(input_tokens=9, output_tokens=1290, image_count=1)),
)


def completed(n: int, clients: int = 3) -> OperationCompleted:
    """Operation ``n`` as the generation stage records it, priced with the built-in table."""
    operation_type, model, usage_of = SHAPES[n % len(SHAPES)]
    usage = usage_of(n)
    success = n % 11 != 5
    requested = START + timedelta(hours=5 * n)  # spread over several days
    return OperationCompleted(
        request_id=f"req-{n}", client_id=f"client-{n % clients}",
        operation_id=f"op-{n:04d}", requested_at=requested,
        occurred_at=requested + timedelta(seconds=2 + n % 40),
        operation_type=operation_type,  # type: ignore[arg-type]
        provider="simulated", model=model, success=success,
        usage=usage if success else Usage(),
        cost_usd=PRICE_TABLES[0].cost(model, usage) if success else Decimal(0),
        price_version=PRICE_TABLES[0].version, duration_ms=1000 + 37 * n,
        error_message=None if success else "simulated failure",
        poll_count=n % 6 if operation_type == "video_generation" else 0,
    )


def totals_of(events: list[OperationCompleted]) -> dict[str, tuple[int, Decimal]]:
    out: dict[str, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for e in {e.operation_id: e for e in events}.values():
        count, cost = out[e.client_id]
        out[e.client_id] = (count + 1, cost + e.cost_usd)
    return dict(out)


def aipipe(
    settings: Settings, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "aipipe", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def delete_operation(dsn: str, database: str, operation_id: str) -> None:
    """In a process of its own: the test process may not open a second chDB path."""
    code = (
        "import sys, clickhouse_connect\n"
        "c = clickhouse_connect.get_client(dsn=sys.argv[1])\n"
        "c.command(f\"ALTER TABLE `{sys.argv[2]}`.ai_cost_tracking DELETE WHERE "
        "operation_id = '{sys.argv[3]}' SETTINGS mutations_sync = 2\")\n"
        "c.close()\n"
        "from aipipe.infra.leave import leave\n"
        "leave(0)\n"  # not through chDB's exit handlers, which can hang
    )
    subprocess.run([sys.executable, "-c", code, dsn, database, operation_id], check=True,
                   timeout=120, capture_output=True)


@pytest.fixture
def crashed_and_restarted(
    settings: Settings,
) -> Iterator[tuple[Settings, WorkerProcess, list[OperationCompleted]]]:
    """A run whose sink died after an insert, before the commit, and was restarted, and
    that then received duplicates: five events delivered again, and one re-run whose copy
    differs in duration (the later copy wins, as ``FINAL`` reads it)."""
    settings = settings.model_copy(update={"sink_batch_size": 10, "sink_batch_seconds": 0.2})
    prepare_topics(settings)
    events = [completed(n) for n in range(60)]
    sink = WorkerProcess(settings, "costs")
    try:
        produce(settings, settings.topics.completed, events)
        sink.start(fault="after_insert@2")
        assert sink.wait_exit(180) == -9, sink.log_tail()
        sink = WorkerProcess(settings, "costs").start()
        store = store_of(settings, sink)
        wait_recorded(store, len(events), timeout=180, worker=sink)
        rerun = events[3].model_copy(update={"duration_ms": 99_999})
        marker = completed(999).model_copy(update={"client_id": "marker"})
        produce(settings, settings.topics.completed, [*events[10:15], rerun, marker])
        wait_for(lambda: "marker" in store.totals(), 120, "the marker after the duplicates")
        everything = [*events, marker]
        assert store.totals() == totals_of(everything)
        yield settings, sink, everything
    finally:
        sink.stop()


def test_replay_rebuilds_exactly_verify_names_a_missing_row_and_repricing_doubles_one_model(
    crashed_and_restarted: tuple[Settings, WorkerProcess, list[OperationCompleted]],
    tmp_path: Path,
) -> None:
    settings, sink, events = crashed_and_restarted
    store = store_of(settings, sink)
    into = f"chdb://{tmp_path / 'rebuilt'}"

    out = aipipe(settings, "replay", "--into", into, "--json")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["topic"] == settings.topics.completed
    assert len(manifest["ranges"]) == 3
    # every completed event in the log, the six copies included
    assert manifest["events"] == sum(r["end"] - r["start"] for r in manifest["ranges"]) == 67
    assert manifest["rows"] == manifest["events"] and manifest["skipped"] == 0
    assert manifest["price_version"] == "as recorded"
    assert manifest["recorded_price_versions"] == ["2025-10-01"]
    assert "replay:" in out.stderr and "events/s" in out.stderr  # progress shown

    check = aipipe(settings, "replay", "verify", "--into", into)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "matches the live one exactly: 61 operations" in check.stdout

    victim = events[7]
    delete_operation(into, settings.clickhouse_database, victim.operation_id)
    check = aipipe(settings, "replay", "verify", "--into", into, "--json")
    assert check.returncode == 1, check.stdout + check.stderr
    verdict = json.loads(check.stdout)
    assert verdict["matches"] is False
    named = [d for d in verdict["differences"] if victim.operation_id in d["difference"]]
    assert len(named) == 1 and named[0]["client_id"] == victim.client_id
    assert len(verdict["differences"]) == 2  # the client-day's totals, and the operation
    assert "missing from the rebuilt one" in named[0]["difference"]
    assert verdict["live"]["operations"] == 61 and verdict["rebuilt"]["operations"] == 60
    human = aipipe(settings, "replay", "verify", "--into", into)
    assert human.returncode == 1 and victim.operation_id in human.stdout

    doubled = tmp_path / "doubled.toml"
    doubled.write_text(
        'version = "double-image"\nextends = "2025-10-01"\n'
        '[models."gemini-2.5-flash-image"]\n'
        'input_per_million_tokens = "0.60"\noutput_per_million_tokens = "60.00"\n'
    )
    out = aipipe(settings, "replay", "--into", f"chdb://{tmp_path / 'repriced'}",
                 "--price-table", str(doubled), "--json")
    assert out.returncode == 0, out.stderr
    lines = json.loads(out.stdout)["reprice"]["lines"]
    live = {
        (c, m): (n, s) for c, m, n, s in store.client.query(
            f"SELECT client_id, model, count(), sum(cost_usd) FROM "
            f"{settings.clickhouse_database}.ai_cost_tracking FINAL GROUP BY client_id, model"
        ).result_rows
    }
    assert {(x["client_id"], x["model"]) for x in lines} == set(live)
    doubled_models = 0
    for line in lines:
        count, recorded = live[(line["client_id"], line["model"])]
        assert line["operations"] == count
        assert Decimal(line["recorded_usd"]) == recorded
        factor = 2 if line["model"] == "gemini-2.5-flash-image" else 1
        assert Decimal(line["repriced_usd"]) == recorded * factor
        assert Decimal(line["difference_usd"]) == recorded * (factor - 1)
        doubled_models += factor == 2 and recorded > 0
    assert doubled_models >= 3
    by_model: dict[str, Decimal] = defaultdict(Decimal)
    for line in lines:
        by_model[line["model"]] += Decimal(line["difference_usd"])
    assert all(v == 0 for m, v in by_model.items() if m != "gemini-2.5-flash-image")


def test_budget_check_as_of_a_past_time_counts_what_the_log_held_then(settings: Settings) -> None:
    prepare_topics(settings)
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    earlier = max(now - timedelta(minutes=5), month)

    def acme(n: int) -> OperationCompleted:
        return completed(n).model_copy(update={
            "client_id": "acme", "operation_id": f"acme-{n}", "requested_at": earlier,
            "occurred_at": earlier + timedelta(seconds=n)})

    first, later = [acme(n) for n in range(12)], [acme(n) for n in range(12, 20)]
    worker = WorkerProcess(settings, "costs").start()
    try:
        produce(settings, settings.topics.completed, first)
        as_of = datetime.now(UTC) + timedelta(milliseconds=2)
        wait_for(lambda: datetime.now(UTC) > as_of + timedelta(milliseconds=2), 5, "the clock")
        # backdated: incurred before as_of, but the log only had it after
        produce(settings, settings.topics.completed, later)
        store = store_of(settings, worker)
        wait_recorded(store, 20, timeout=120, worker=worker)

        def check(*extra: str) -> dict[str, str]:
            out = aipipe(settings, "budget", "check", "--client", "acme", "--limit", "1000",
                         "--json", *extra)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)  # type: ignore[no-any-return]

        then, today = check("--as-of", as_of.isoformat()), check()
        assert Decimal(then["spend_usd"]) == sum(e.cost_usd for e in first) > 0
        assert Decimal(today["spend_usd"]) == sum(e.cost_usd for e in [*first, *later])
        assert then["as_of"] == as_of.isoformat()
        assert sum(then["log_offsets"].values()) == 12  # type: ignore[arg-type]
    finally:
        worker.stop()


def test_replay_takes_what_the_live_sink_takes(settings: Settings, tmp_path: Path) -> None:
    """Completions over 101 months (more than one insert may touch), a dall-e-3 image
    re-priced (priced by size and quality, which the row does not keep), and a record
    whose header name is not UTF-8: the replay rebuilds every one, where it stopped or hung
    on each."""
    prepare_topics(settings)
    spread = [completed(n).model_copy(update={
        "operation_id": f"month-{n}", "requested_at": START - timedelta(days=31 * n)})
        for n in range(101)]
    usage = Usage(image_count=1, image_variant="hd 1024x1792")
    table = PRICE_TABLES[-1]
    dalle = completed(1).model_copy(update={
        "operation_id": "dalle", "provider": "openai", "model": "dall-e-3", "success": True,
        "operation_type": "image_generation", "usage": usage, "error_message": None,
        "cost_usd": table.cost("dall-e-3", usage), "price_version": table.version})
    produce(settings, settings.topics.completed, [*spread, dalle])
    kcat(settings, settings.topics.completed, "hdr", unreadable_completed("unreadable"),
         BAD_HEADER)

    out = aipipe(settings, "replay", "--into", f"chdb://{tmp_path / 'rebuilt'}",
                 "--price-version", table.version, "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert (manifest["events"], manifest["rows"], manifest["skipped"]) == (103, 103, 0)
    [line] = [x for x in manifest["reprice"]["lines"] if x["model"] == "dall-e-3"]
    assert Decimal(line["repriced_usd"]) == Decimal(line["recorded_usd"]) == dalle.cost_usd
