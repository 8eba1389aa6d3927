"""Many provider calls in flight per worker, bounded by a setting, never by the agent loop.

One real ``aipipe run streams`` worker and the simulated provider at a fixed latency:

* N operations of latency L with an in-flight cap C finish in about N·L/C, far under the
  N·L a one-at-a-time agent takes (the deadline is a quarter of the serial time, wide
  headroom on a busy machine; the figure itself is a benchmark's business);
* an operation that takes 60 s holds back nothing: requests sent after it, from other
  clients and the same one, complete while it is still running;
* a backlog of requests holds back no generation: the first completion comes while most
  requests still wait for their decision.
"""

from __future__ import annotations

import time

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.support.ledger import Ledger, produce_backlog, read_topic

pytestmark = pytest.mark.e2e


def slow(i: int, latency_ms: int, client: str) -> OperationRequested:
    return OperationRequested(
        request_id=f"slow-{i}", client_id=client, operation_type="image_generation",
        provider="simulated", model="gemini-2.5-flash-image",
        params={"prompt": "p", "simulate": {"latency_ms": latency_ms}},
    )


def concurrent(settings: Settings, in_flight: int) -> Settings:
    return settings.model_copy(update={
        "rate_limit": "1000000/1s", "generation_max_in_flight": in_flight,
        "simulated_max_latency_ms": 60_000,
    })


def test_n_operations_of_latency_l_take_about_n_l_over_c(settings: Settings) -> None:
    n, latency_ms, cap = 200, 1000, 50
    settings = concurrent(settings, cap)
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    ledger = Ledger(settings)
    try:
        warm = [slow(-1, 0, "warm-up")]  # wait for the worker to be up before timing
        produce_backlog(settings, warm)
        wait_for(lambda: (ledger.poll(), ledger.completed() == 1)[1], 120, "the worker's start")
        requests = [slow(i, latency_ms, f"client-{i % 6}") for i in range(n)]
        started = time.monotonic()
        produce_backlog(settings, requests)
        serial = n * latency_ms / 1000

        def all_done() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return ledger.completed() == n + 1

        wait_for(all_done, serial / 4, f"{n} operations in a quarter of {serial:.0f} s")
        took = time.monotonic() - started
        print(f"{n} operations of {latency_ms} ms with {cap} in flight: {took:.1f} s "
              f"(serial {serial:.0f} s, ideal {serial / cap:.1f} s)")
        assert ledger.problems(r.event_id for r in requests) == []
    finally:
        ledger.close()
        worker.stop()


def test_a_slow_operation_holds_back_nothing(settings: Settings) -> None:
    settings = concurrent(settings, 64)
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    ledger = Ledger(settings)
    try:
        stuck = slow(0, 60_000, "client-a")
        produce_backlog(settings, [stuck])
        wait_for(lambda: (ledger.poll(), ledger.decided() == 1)[1], 120, "the slow one admitted")
        after = [slow(i, 50, "client-a" if i % 2 else "client-b") for i in range(1, 41)]
        produce_backlog(settings, after)

        def others_done() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return all(ledger.completed_for(r.event_id) for r in after)

        wait_for(others_done, 45, "the 40 operations sent after the slow one")
        assert not ledger.completed_for(stuck.event_id)  # still running: it came first
        wait_for(lambda: (ledger.poll(), ledger.completed_for(stuck.event_id))[1], 120,
                 "the slow operation itself")
        assert ledger.problems([stuck.event_id, *(r.event_id for r in after)]) == []
    finally:
        ledger.close()
        worker.stop()


def test_a_backlog_of_requests_does_not_hold_back_generation(settings: Settings) -> None:
    """Admission and generation take turns at a backlog: the first completions come while
    most requests still wait for their decision (``streams.consumer.TakingTurnsThread``;
    before, each requests partition's whole fetch went first, and generation began once
    admission had nearly drained the backlog)."""
    count = 8000
    settings = concurrent(settings, 500).model_copy(update={"partitions": 4})
    prepare_topics(settings)
    requests = [OperationRequested(
        request_id=f"b{i}", client_id=f"client-{i % 20}", operation_type="image_generation",
        provider="simulated", model="gemini-2.5-flash-image", params={"prompt": "p"})
        for i in range(count)]
    produce_backlog(settings, requests)
    worker = WorkerProcess(settings, "streams").start()
    ledger = Ledger(settings)
    try:
        def all_done() -> bool:
            ledger.poll()
            assert worker.alive(), worker.log_tail()
            return ledger.completed() == count

        wait_for(all_done, 600, f"{count} completions")
        assert ledger.problems(r.event_id for r in requests) == []
    finally:
        ledger.close()
        worker.stop()
    # the worker's own clock stamps both topics' records (their create time)
    decided = sorted(m.timestamp()[1] for m in read_topic(settings, settings.topics.admitted))
    first_completion = min(m.timestamp()[1]
                           for m in read_topic(settings, settings.topics.completed))
    assert len(decided) == count
    before = sum(1 for stamp in decided if stamp < first_completion)
    print(f"decisions before the first completion: {before} of {count}")
    assert before < count // 2, f"{before} of {count} requests were decided first"
