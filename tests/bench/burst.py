"""The burst: N pre-produced requests through the whole pipeline, next to a bare faust agent.

One ``aipipe run all`` worker (admission, generation with the simulated provider at 0 ms,
the cost sink into a fresh chDB) starts on ``N`` requests produced before it (rate
limit raised so that every request is admitted). The figure is operations per second
end to end: ``N`` over the time from the first ``operation.admitted`` record to the last
cost row's ``ingested_at`` (the worker's start-up is not counted). Beside it, each
stage's own rate over its output (first to last record of ``operation.admitted``,
``operation.completed``, cost rows), and, in the same run, a faust agent that only copies
the same ``N`` records from one topic to another: faust's own pass-through, the ceiling
of any one faust stage on this machine. The run checks that ClickHouse holds exactly
``N`` rows for ``N`` operations.

Run alone: ``python -m tests.bench.burst --count 20000``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess
from aipipe.producers import EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.bench.admission import _faust_passthrough_round, _round_settings
from tests.bench.generation import cpu_seconds
from tests.bench.latency import delete_topics
from tests.bench.report import TIMES, Figure
from tests.bench.settings import bench_settings
from tests.support.pipeline import rows_and_operations, store_of

Say = Callable[[str], None]
PROGRESS_SECONDS = 5.0


def burst_requests(count: int, tag: str) -> list[OperationRequested]:
    """Image requests for the simulated provider at 0 ms, over 500 clients."""
    return [OperationRequested(
        request_id=f"{tag}-{i}", client_id=f"client-{i % 500:03d}",
        operation_type="image_generation", provider="simulated",
        model="gemini-2.5-flash-image",
        params={"prompt": "a watercolour lighthouse at dawn", "simulate": {"latency_ms": 0}},
    ) for i in range(count)]


class StageStamps:
    """Record timestamps (ms) of the admitted and completed topics, read as they come."""

    def __init__(self, settings: Settings) -> None:
        t = settings.topics
        self.admitted_topic, self.completed_topic = t.admitted, t.completed
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                  "group.id": f"bench-burst-{uuid.uuid4().hex[:8]}",
                                  "auto.offset.reset": "earliest",
                                  "enable.auto.commit": False})
        self.consumer.subscribe([t.admitted, t.rejected, t.completed])
        self.stamps: dict[str, list[int]] = {"admitted": [], "rejected": [], "completed": []}

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for m in self.consumer.consume(num_messages=10_000, timeout=0.2):
                if m.error() is None:
                    topic = m.topic()
                    stage = ("admitted" if topic == self.admitted_topic else
                             "completed" if topic == self.completed_topic else "rejected")
                    self.stamps[stage].append(m.timestamp()[1])

    def close(self) -> None:
        self.consumer.close()


def span_rate(count: int, first_ms: float, last_ms: float) -> float:
    return count / ((last_ms - first_ms) / 1000) if last_ms > first_ms else 0.0


def pipeline_burst(base: Settings, count: int, say: Say, timeout: float = 1800,
                   split: bool = False) -> dict[str, float]:
    """The run: one ``aipipe run all`` worker, or (``split``) ``aipipe run streams`` and
    ``aipipe run costs`` as two processes; CPU is theirs (and their children's)."""
    name = f"benchburst{uuid.uuid4().hex[:8]}"
    home = Path(tempfile.mkdtemp(prefix="aipipe-burst-"))
    settings = base.model_copy(update={
        "home": home, "topic_prefix": name, "clickhouse_database": name,
        "clickhouse_url": "", "query_port": 0, "simulated_latency_ms": 0,
        "simulated_enabled": True, "env": "production", "rate_limit": "1000000000/60s",
    })
    prepare_topics(settings)
    say(f"  producing {count:,} requests before the worker starts")
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_many(settings.topics.requested, burst_requests(count, "burst"))
    stamps = StageStamps(settings)
    workers = [WorkerProcess(settings, role, log_path=home / f"worker-{role}.log").start()
               for role in (("costs", "streams") if split else ("all",))]
    worker = workers[0]  # the one that owns chDB and its read endpoint

    def used() -> float:
        return sum(cpu_seconds(w.pid) for w in workers)

    kept = False
    try:
        store = store_of(settings, worker)
        started, rows, cpu_before = time.monotonic(), 0, used()
        while rows < count:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{rows:,} of {count:,} cost rows after {timeout:.0f}s")
            for w in workers:
                if not w.alive():
                    raise RuntimeError(f"the {w.role} worker exited:\n{w.log_tail()}")
            stamps.poll(PROGRESS_SECONDS)
            rows = int(store.client.query(f"SELECT count() FROM {store.table}").result_rows[0][0])
            s = stamps.stamps
            say(f"    {time.monotonic() - started:5.0f}s  admitted {len(s['admitted']):>7,}"
                f"  rejected {len(s['rejected']):>5,}  completed {len(s['completed']):>7,}"
                f"  cost rows {rows:>7,}")
        cpu = used() - cpu_before
        stamps.poll(1.0)
        first_row, last_row = (float(v) for v in store.client.query(
            f"SELECT toUnixTimestamp64Milli(min(ingested_at)),"
            f" toUnixTimestamp64Milli(max(ingested_at)) FROM {store.table}").result_rows[0])
        final_rows, operations = rows_and_operations(store)
        if final_rows != count or operations != count or stamps.stamps["rejected"]:
            raise AssertionError(f"expected {count} rows of {count} operations, found "
                                 f"{final_rows} rows of {operations} operations "
                                 f"({len(stamps.stamps['rejected'])} rejected)")
    except BaseException:
        kept = True
        say(f"  the worker's log and data are kept in {home}")
        raise
    finally:
        stamps.close()
        for w in workers:
            w.stop()
        if not kept:
            shutil.rmtree(home, ignore_errors=True)
        delete_topics(settings.kafka_bootstrap, name)
    admitted, completed = sorted(stamps.stamps["admitted"]), sorted(stamps.stamps["completed"])
    return {
        "end_to_end": span_rate(count, admitted[0], last_row),
        "admission": span_rate(len(admitted), admitted[0], admitted[-1]),
        "generation": span_rate(len(completed), completed[0], completed[-1]),
        "costs": span_rate(count, first_row, last_row),
        "seconds": (last_row - admitted[0]) / 1000,
        "completed_lag_ms": completed[-1] - admitted[-1],
        "rows_lag_ms": last_row - completed[-1],
        "cpu_ms_per_operation": cpu * 1000 / count,
    }


def faust_passthrough(base: Settings, count: int, hops: int = 1, processes: int = 1) -> float:
    """Records/s of faust agents that copy ``count`` records over ``hops`` topics, in
    ``processes`` workers (``_faust_passthrough_round``)."""
    home = Path(tempfile.mkdtemp(prefix="aipipe-burst-copy-"))
    try:
        return _faust_passthrough_round(_round_settings(base, home, base.partitions),
                                        burst_requests(count, "copy"), home, hops, processes)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def bench_burst(settings: Settings, say: Say, count: int = 100_000) -> list[Figure]:
    say(f"[bold]burst[/bold]: {count:,} pre-produced requests through the whole pipeline "
        "(0 ms provider)")
    rates = pipeline_burst(settings, count, say)
    say("  the same, streams and costs as two processes (`aipipe run streams` + `costs`)")
    apart = pipeline_burst(settings, count, say, split=True)
    say(f"  faust pass-through: a bare copy agent over {count:,} records")
    bare = faust_passthrough(settings, count)
    say("  the streams' two hops bare (requested → admitted → completed, copy agents in one "
        "faust worker)")
    chain = faust_passthrough(settings, count, hops=2)
    for stage in ("admission", "generation", "costs", "end_to_end"):
        say(f"    {stage:<12} {rates[stage]:>8,.0f} /s   "
            f"{rates[stage] / bare:5.2f}{TIMES} the faust copy agent")
    say(f"    faust copy   {bare:>8,.0f} /s")
    say(f"    faust copy, two hops in one worker {chain:>8,.0f} /s (the most one streams "
        "worker could do with no work of its own)")
    say(f"    worker CPU {rates['cpu_ms_per_operation']:.2f} ms per operation, all stages")
    say(f"    two processes: end to end {apart['end_to_end']:,.0f} /s, admission "
        f"{apart['admission']:,.0f} /s, CPU {apart['cpu_ms_per_operation']:.2f} ms per "
        "operation over both")
    method = (f"{count:,} requests produced before one `aipipe run all` worker starts "
              "(admission, generation at 0 ms, cost sink into chDB; every request "
              "admitted): N / (last cost row ingested_at - first admitted record); "
              "baseline: a faust agent copying the same N records topic to topic, "
              f"same run; {settings.partitions} partitions")
    notes = {"count": count, "faust_copy_per_second": round(bare),
             "faust_copy_two_hops_per_second": round(chain),
             **{f"{k}_per_second": round(v) for k, v in rates.items()
                if k in ("admission", "generation", "costs", "end_to_end")},
             "seconds": round(rates["seconds"], 1),
             "worker_cpu_ms_per_operation": round(rates["cpu_ms_per_operation"], 2),
             "completed_after_last_admitted_ms": round(rates["completed_lag_ms"]),
             "last_row_after_last_completed_ms": round(rates["rows_lag_ms"]),
             "goal": ">= 3,000 operations/s end to end",
             "two_processes_end_to_end_per_second": round(apart["end_to_end"]),
             "two_processes_admission_per_second": round(apart["admission"]),
             "two_processes_cpu_ms_per_operation": round(apart["cpu_ms_per_operation"], 2)}
    figures = [Figure("burst operations/s end to end (vs faust copy agent)", "ops/s",
                      rates["end_to_end"], bare, None, method, notes=notes),
               Figure("burst operations/s end to end, streams and costs as two processes "
                      "(vs faust copy agent)", "ops/s", apart["end_to_end"], bare, None,
                      method.replace("one `aipipe run all` worker", "`aipipe run streams` and "
                                     "`aipipe run costs` as two processes"), notes=notes)]
    figures += [Figure(f"burst: {stage} stage rate (vs faust copy agent)", "ops/s",
                       rates[stage], bare, None, method + f"; the {stage} stage's output, "
                       "first to last record", notes=notes)
                for stage in ("admission", "generation", "costs")]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.burst")
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args(argv)
    for f in bench_burst(bench_settings(), print, args.count):
        print(f"{f.metric}: {f.ours:,.0f} {f.unit} vs {f.baseline:,.0f} ({f.ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
