"""Scaling out never costs an event: streams workers started, added and killed under load.

A backlog of requests from 50 clients waits on four partitions; ``aipipe run costs`` and
two or three ``aipipe run streams`` workers start at once (the start-up rebalances happen
while the first fetches are in flight), and in one scenario a worker is added and
another SIGKILLed mid-run. Every request must get exactly one decision and exactly one
completion, and the cost table must hold exactly one row per operation, counted without
``FINAL`` after ``OPTIMIZE FINAL``, with per-client totals equal to the produced sum.

Before ``aipipe.streams.consumer.SafeSeekConsumer``, faust committed past messages it
had skipped at a rebalance (see that module): 4 of 6 two-worker runs of 100,000 requests
lost operations. ``AIPIPE_SCALE_REQUESTS`` and ``AIPIPE_SCALE_ROUNDS`` make this a soak.
"""

from __future__ import annotations

import os
import time
from decimal import Decimal

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.support.ledger import (
    IMAGE_COST,
    Ledger,
    image_requests,
    physical_cost_rows,
    produce_backlog,
)

pytestmark = pytest.mark.e2e

REQUESTS = int(os.environ.get("AIPIPE_SCALE_REQUESTS", "12000"))
ROUNDS = int(os.environ.get("AIPIPE_SCALE_ROUNDS", "1"))
CLIENTS = 50
STALL_SECONDS = 120  # no completion for this long: something was lost (or wedged)


def scaled(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "partitions": 4,
        "rate_limit": "1000000/1s",  # admit everything: every request must be completed
        "worker_session_timeout_seconds": 6.0,
        "sink_batch_size": 2000,
        "sink_batch_seconds": 0.5,
        "archive_events": False,
    })


def run_round(settings: Settings, workers: int, churn: bool) -> None:
    prepare_topics(settings)
    requests = image_requests(REQUESTS, CLIENTS)
    produce_backlog(settings, requests)
    home = settings.home
    costs = WorkerProcess(settings, "costs", log_path=home / "costs.log").start()
    streams = [WorkerProcess(settings, "streams", log_path=home / f"streams-{k}.log").start()
               for k in range(workers)]
    ledger = Ledger(settings)
    try:
        settle(settings, ledger, costs, streams, requests, churn)
    finally:
        ledger.close()
        for worker in [*streams, costs]:
            worker.stop()  # a no-op for those already stopped


def settle(
    settings: Settings, ledger: Ledger, costs: WorkerProcess, streams: list[WorkerProcess],
    requests: list[OperationRequested], churn: bool,
) -> None:
    """Run the round to its end and check every outcome (the caller cleans up)."""
    home = settings.home
    moved = [time.monotonic(), -1]  # when the completions last moved, and their count
    def progressed(at: int) -> bool:
        ledger.poll()
        for worker in [costs, *streams[1:]]:
            assert worker.alive(), worker.log_tail()
        if ledger.completed() != moved[1]:
            moved[:] = [time.monotonic(), ledger.completed()]
        stalled = time.monotonic() - moved[0]
        assert stalled < STALL_SECONDS, (
            f"no completion for {stalled:.0f} s at {ledger.completed()} of {len(requests)}: "
            f"{ledger.problems(r.event_id for r in requests)[:5]}")
        return ledger.completed() >= at

    if churn:  # a worker joins, then another dies without a word, both mid-run
        wait_for(lambda: progressed(REQUESTS // 5), 300, "a fifth of the completions")
        streams.append(WorkerProcess(
            settings, "streams", log_path=home / "streams-added.log").start())
        wait_for(lambda: progressed(REQUESTS // 2), 300, "half of the completions")
        streams[0].kill()
    wait_for(lambda: progressed(REQUESTS), 600,
             f"{REQUESTS} completions (have {ledger.completed()})")
    deadline = time.monotonic() + 5  # duplicates that are still on their way
    while time.monotonic() < deadline:
        ledger.poll()
    assert ledger.problems(r.event_id for r in requests) == []
    assert sum(ledger.reasons.values()) == 0
    for worker in streams:
        worker.stop()
    costs_settled(settings, costs, requests=len(requests), clients=CLIENTS)


def costs_settled(
    settings: Settings, costs: WorkerProcess, requests: int, clients: int,
    expected: dict[str, tuple[Decimal, int]] | None = None,
) -> None:
    """Wait until the sink has every row, stop it, and count the rows on disk.

    The requests are ``image_requests(requests, clients)``: every client has the same
    number of one-image operations, each of ``IMAGE_COST``; or ``expected`` says each
    client's total and operations.
    """
    from tests.support.pipeline import operations_recorded, store_of

    store = store_of(settings, costs)
    wait_for(lambda: operations_recorded(store) >= requests, 300, f"{requests} cost rows")
    costs.stop()
    assert costs.wait_exit(30) == 0, costs.log_tail()
    counted = physical_cost_rows(settings)
    assert counted["rows"] == requests, counted
    assert counted["operations"] == requests
    per_client = counted["per_client"]
    assert isinstance(per_client, dict)
    assert len(per_client) == clients, per_client
    each = requests // clients
    for client in range(clients):
        total, rows = per_client[f"client-{client}"]
        want, count = (expected or {}).get(f"client-{client}", (IMAGE_COST * each, each))
        assert rows == count
        assert Decimal(total) == want.quantize(Decimal("0.000000001"))


@pytest.mark.parametrize(
    ("workers", "churn"),
    [(2, False), (3, False), (2, True)],
    ids=["two-workers", "three-workers", "one-added-one-killed"],
)
def test_streams_workers_scaling_under_load_lose_nothing(
    settings: Settings, workers: int, churn: bool
) -> None:
    for n in range(ROUNDS):
        round_settings = scaled(settings).model_copy(update={
            "topic_prefix": f"{settings.topic_prefix}-{n}",
            "clickhouse_database": f"{settings.clickhouse_database}_{n}",
            "home": settings.home / f"round-{n}",
        })
        run_round(round_settings, workers, churn)
