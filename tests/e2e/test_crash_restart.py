"""The whole pipeline SIGKILLed under load and started again, many times in one run.

Each cycle produces a few hundred requests, kills ``aipipe run`` (every part in one
process) once some of them are decided, produces more while it is down, starts it
again and requires, within a deadline, that every request produced so far has exactly
one decision and one completion. After the last cycle the cost table must hold exactly
one row per operation (without ``FINAL``, after ``OPTIMIZE FINAL``) and per-client
totals equal to the produced sum. ``AIPIPE_RESTART_CYCLES`` makes it a longer soak.
"""

from __future__ import annotations

import os
import time

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from tests.e2e.test_scaling import costs_settled
from tests.support.ledger import Ledger, image_requests, produce_backlog

pytestmark = pytest.mark.e2e

CYCLES = int(os.environ.get("AIPIPE_RESTART_CYCLES", "10"))
PER_CYCLE = 300
CLIENTS = 50


def test_sigkill_and_restart_of_the_whole_pipeline_loses_nothing(settings: Settings) -> None:
    settings = settings.model_copy(update={
        "partitions": 4,
        "rate_limit": "1000000/1s",
        "worker_session_timeout_seconds": 6.0,  # the broker's minimum
        "admission_batch_size": 50,
        "sink_batch_seconds": 0.3,
    })
    prepare_topics(settings)
    ledger = Ledger(settings)
    produced: list[str] = []
    worker = WorkerProcess(settings, "all", log_path=settings.home / "all-0.log").start()

    def send(cycle: int, part: str) -> None:
        batch = image_requests(PER_CYCLE // 2, CLIENTS, prefix=f"c{cycle}{part}-")
        produce_backlog(settings, batch)
        produced.extend(r.event_id for r in batch)

    try:
        for cycle in range(CYCLES):
            send(cycle, "a")
            goal = ledger.decided() + PER_CYCLE // 6

            def some_decided(goal: int = goal, worker: WorkerProcess = worker) -> bool:
                ledger.poll()
                assert worker.alive(), worker.log_tail()
                return ledger.decided() >= goal

            wait_for(some_decided, 120, f"cycle {cycle}: some requests decided")
            worker.kill()  # SIGKILL, mid-load
            send(cycle, "b")
            worker = WorkerProcess(
                settings, "all", log_path=settings.home / f"all-{cycle + 1}.log").start()
            started = time.monotonic()

            def all_done(worker: WorkerProcess = worker) -> bool:
                ledger.poll()
                assert worker.alive(), worker.log_tail()
                done = len(produced)
                return ledger.decided() >= done and ledger.completed() >= done

            wait_for(all_done, 150, f"cycle {cycle}: all {len(produced)} requests done "
                     f"(decided {ledger.decided()}, completed {ledger.completed()})")
            print(f"cycle {cycle}: {len(produced)} done {time.monotonic() - started:.1f}s "
                  "after the restart")
        assert ledger.problems(produced) == []
    except BaseException:
        worker.kill()
        raise
    finally:
        ledger.close()
    costs_settled(settings, worker, requests=len(produced), clients=CLIENTS)
