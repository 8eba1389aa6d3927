"""The whole pipeline on the real local Kafka and the embedded ClickHouse engine.

Workers run as real ``aipipe run`` processes; the test produces requests, reads the cost
table back through the worker's read endpoint, and compares with costs computed here by
hand from the published prices (not by calling the pipeline's own price code).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import read_headers
from aipipe.schemas.events import OperationCompleted, OperationRequested, Usage, decode, encode
from tests.support.pipeline import (
    consume,
    operations_recorded,
    produce,
    produce_raw,
    rows_and_operations,
    store_of,
    wait_recorded,
)

pytestmark = pytest.mark.e2e

MILLION = Decimal(1_000_000)


def hand_priced(event: OperationRequested) -> Decimal:
    """Cost of one simulated operation, from the price list, written out by hand."""
    p = event.params
    if (p.get("simulate") or {}).get("fail"):
        return Decimal(0)
    tokens_in = Decimal(math.ceil(len(p.get("prompt", "")) / 4))
    prompt_cost = tokens_in * Decimal("0.30") / MILLION
    if event.model == "gemini-2.5-flash-image":
        cost = prompt_cost + 1290 * p.get("n", 1) * Decimal(30) / MILLION
    elif event.model == "gemini-2.5-flash":
        cost = prompt_cost + p["max_output_tokens"] * Decimal("2.50") / MILLION
    elif event.model == "veo-3.0-generate-001":
        cost = Decimal(p["duration_seconds"]) * Decimal("0.40")
    else:
        cost = Decimal(p["duration_seconds"]) * Decimal("0.15")
    return cost.quantize(Decimal("0.000000001"))


def requests(count: int, clients: int = 4) -> list[OperationRequested]:
    events = []
    for i in range(count):
        kind = i % 5
        params: dict[str, object] = {"prompt": "studio shot of a red chair " * (i % 7 + 1)}
        if kind in (0, 1, 2):
            op, model = "image_generation", "gemini-2.5-flash-image"
            params["n"] = i % 4 + 1
        elif kind == 3:
            op = "video_generation"
            model = "veo-3.0-generate-001" if i % 2 else "veo-3.0-fast-generate-001"
            params["duration_seconds"] = (4, 6, 8)[i % 3]
        else:
            op, model = "text_generation", "gemini-2.5-flash"
            params["max_output_tokens"] = 100 + i
        if i % 17 == 0:
            params["simulate"] = {"fail": True}
        events.append(
            OperationRequested(
                request_id=f"req-{i}",
                client_id=f"client-{i % clients}",
                operation_type=op,  # type: ignore[arg-type]
                model=model,
                params=params,
            )
        )
    return events


def expected_totals(events: list[OperationRequested]) -> dict[str, tuple[int, Decimal]]:
    totals: dict[str, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for e in events:
        n, cost = totals[e.client_id]
        totals[e.client_id] = (n + 1, cost + hand_priced(e))
    return dict(totals)


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[WorkerProcess]:
    prepare_topics(settings)
    worker = WorkerProcess(settings, "all").start()
    yield worker
    worker.stop()


def test_costs_per_client_are_exact(settings: Settings, pipeline: WorkerProcess) -> None:
    events = requests(120)
    produce(settings, settings.topics.requested, events)
    store = store_of(settings, pipeline)
    wait_recorded(store, len(events), timeout=180, worker=pipeline)

    assert store.totals() == expected_totals(events)
    assert rows_and_operations(store) == (120, 120)
    failed = sum(1 for e in events if e.params.get("simulate"))
    summary = store.summary("client-0", None, None)
    assert summary.operation_count == 30
    assert summary.failure_count == sum(
        1 for e in events if e.client_id == "client-0" and e.params.get("simulate")
    )
    assert failed > 0


def test_the_same_requests_twice_count_once(settings: Settings, pipeline: WorkerProcess) -> None:
    events = requests(40)
    produce(settings, settings.topics.requested, events)
    store = store_of(settings, pipeline)
    wait_recorded(store, len(events), timeout=180, worker=pipeline)

    produce(settings, settings.topics.requested, events)  # an upstream retry: same event_ids
    # and a completed event delivered twice (a re-run generation step after a crash): the
    # same run, so the same admission time, priced the same
    [first] = [m for m in consume(settings, settings.topics.completed, len(events))
               if orjson.loads(m.value())["operation_id"] == events[0].event_id]
    copy = _completed_copy(events[0]).model_copy(update={
        "requested_at": decode(first.value()).requested_at})  # type: ignore[union-attr]
    produce(settings, settings.topics.completed, [copy])
    marker = requests(1)[0].model_copy(update={"event_id": "marker", "client_id": "marker"})
    produce(settings, settings.topics.requested, [marker])
    wait_for(lambda: "marker" in store.totals(), 120, "the marker after the duplicates")

    totals = store.totals()
    del totals["marker"]
    assert totals == expected_totals(events)


def test_another_clients_event_id_is_another_request(
    settings: Settings, pipeline: WorkerProcess
) -> None:
    """An ``event_id`` is unique within its client: two clients using the same ids (in
    the same batch, and later) each get every operation decided, run, polled and costed
    once; one worker holds every partition, so each meets the other's dedup marks."""
    base = requests(10)  # images, videos and text, on client-0..3
    same_ids = [e.model_copy(update={"client_id": "twin"}) for e in base]
    produce(settings, settings.topics.requested, [*base, *same_ids])
    store = store_of(settings, pipeline)
    wait_recorded(store, 20, timeout=180, worker=pipeline)
    later = [e.model_copy(update={"client_id": "latecomer"}) for e in base]
    produce(settings, settings.topics.requested, [*later, *base])  # base again: duplicates
    wait_for(lambda: store.totals().get("latecomer", (0,))[0] == 10, 120,
             "the latecomer's operations")
    marker = requests(1)[0].model_copy(update={"event_id": "marker", "client_id": "marker"})
    produce(settings, settings.topics.requested, [marker])
    wait_for(lambda: "marker" in store.totals(), 120, "the marker after the duplicates")

    totals = store.totals()
    del totals["marker"]
    assert totals == expected_totals([*base, *same_ids, *later])
    assert rows_and_operations(store) == (31, 11)  # operation ids repeat across clients


def _completed_copy(request: OperationRequested) -> OperationCompleted:
    return OperationCompleted(
        request_id=request.request_id,
        client_id=request.client_id,
        operation_id=request.event_id,
        requested_at=request.occurred_at,
        operation_type=request.operation_type,
        provider="simulated",
        model=request.model,
        success=True,
        usage=Usage(),
        cost_usd=hand_priced(request),
        price_version="2025-10-01",
        duration_ms=1,
    )


def test_malformed_messages_go_to_the_deadletter_topic(
    settings: Settings, pipeline: WorkerProcess
) -> None:
    good = requests(30)
    missing_field = orjson.loads(encode(good[0]))
    del missing_field["model"]
    missing_field["event_id"] = "no-model"
    bad = [
        (b"c", b"{not json"),
        (b"c", orjson.dumps(missing_field)),
        (b"c", orjson.dumps({**missing_field, "model": "m", "event_type": "operation.exploded"})),
    ]
    produce(settings, settings.topics.requested, good[:15])
    produce_raw(settings, settings.topics.requested, bad)
    produce(settings, settings.topics.requested, good[15:])
    produce_raw(settings, settings.topics.completed, [(b"c", b"[1, 2]")])

    store = store_of(settings, pipeline)
    wait_recorded(store, len(good), timeout=180, worker=pipeline)
    assert store.totals() == expected_totals(good)

    dead = consume(settings, settings.topics.deadletter, expected=4, timeout=60)
    by_value = {m.value(): read_headers(m.headers()) for m in dead}
    assert len(dead) == 4
    assert set(by_value) == {value for _, value in bad} | {b"[1, 2]"}
    assert "not valid JSON" in by_value[b"{not json"]["aipipe.dlq.reason"]
    assert "'model' is missing" in by_value[orjson.dumps(missing_field)]["aipipe.dlq.reason"]
    unknown = by_value[bad[2][1]]
    assert "'operation.exploded'" in unknown["aipipe.dlq.reason"]
    assert unknown["aipipe.dlq.topic"] == settings.topics.requested
    assert unknown["aipipe.dlq.stage"] == "admission"
    assert int(unknown["aipipe.dlq.offset"]) >= 0
    assert by_value[b"[1, 2]"]["aipipe.dlq.stage"] == "costs"


@pytest.mark.parametrize("fault", ["after_insert@3", "before_insert@2", "external-sigkill"])
def test_a_killed_cost_sink_loses_nothing_and_counts_nothing_twice(
    settings: Settings, fault: str
) -> None:
    settings = settings.model_copy(update={"sink_batch_size": 10, "sink_batch_seconds": 0.2})
    prepare_topics(settings)
    events = requests(150, clients=5)
    streams = WorkerProcess(settings, "streams").start()
    sink = WorkerProcess(settings, "costs")
    try:
        produce(settings, settings.topics.requested, events)
        if fault == "external-sigkill":
            sink.start()
            store = store_of(settings, sink)
            wait_for(lambda: operations_recorded(store) >= 30, 180, "30 operations recorded")
            sink.kill()
        else:
            sink.start(fault=fault)
            assert sink.wait_exit(180) == -9, sink.log_tail()
        sink = WorkerProcess(settings, "costs").start()
        store = store_of(settings, sink)
        wait_recorded(store, len(events), timeout=180, worker=sink)
        assert store.totals() == expected_totals(events)
        assert rows_and_operations(store) == (150, 150)
    finally:
        sink.stop()
        streams.stop()


def test_cli_answers_while_the_pipeline_holds_the_database(
    settings: Settings, pipeline: WorkerProcess
) -> None:
    events = [e for e in requests(20) if e.client_id == "client-1"]
    produce(settings, settings.topics.requested, events)
    store = store_of(settings, pipeline)
    wait_recorded(store, len(events), timeout=180, worker=pipeline)
    expected = expected_totals(events)["client-1"][1]

    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "aipipe", "costs", "summary", "--client", "client-1", "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    summary = json.loads(out.stdout)
    assert Decimal(summary["total_cost_usd"]) == expected
    assert summary["operation_count"] == len(events)

    budget = subprocess.run(
        [sys.executable, "-m", "aipipe", "budget", "check", "--client", "client-1",
         "--limit", str(expected), "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    verdict = json.loads(budget.stdout)
    month = datetime.now(UTC).strftime("%Y-%m")
    assert verdict["period_start"].startswith(month)
    assert Decimal(verdict["spend_usd"]) == expected
    assert verdict["over_budget"] is True and budget.returncode == 1
