"""The supervisor of worker threads, and the rollup sealer's own failure policy."""

from __future__ import annotations

import threading
from datetime import date
from typing import Any, NoReturn

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from structlog.testing import capture_logs

from aipipe.consumers.rollups import RollupSealError, Sealer, by_months
from aipipe.infra.supervise import EXIT_THREAD_DIED, Supervisor, WorkerThreadStopped


class Recorder:
    def __init__(self) -> None:
        self.stops = 0
        self.reports: list[tuple[str, str]] = []
        self.exits: list[int] = []
        self.exited = threading.Event()

    def request_stop(self) -> None:
        self.stops += 1

    def report(self, exc: BaseException, name: str) -> None:
        self.reports.append((name, type(exc).__name__))

    def exit(self, code: int) -> NoReturn:  # type: ignore[misc]  # os._exit would not return
        self.exits.append(code)
        self.exited.set()


def supervisor(recorder: Recorder, grace: float = 60.0) -> Supervisor:
    return Supervisor(request_stop=recorder.request_stop, grace_seconds=grace,
                      report=recorder.report, exit=recorder.exit)


def test_a_thread_that_raises_is_logged_reported_and_ends_the_process_with_70() -> None:
    recorder = Recorder()
    sup, stop = supervisor(recorder), threading.Event()

    def sink(stop: threading.Event) -> None:
        raise RuntimeError("the sink met something unexpected")

    with capture_logs() as logs:
        sup.start("cost-sink", sink, stop).join(5)
        [died] = [e for e in logs if e["event"] == "worker_thread_died"]
        assert died["thread"] == "cost-sink" and died["log_level"] == "error"
        assert died["error"] == "RuntimeError: the sink met something unexpected"
        assert recorder.stops == 1 and recorder.reports == [("cost-sink", "RuntimeError")]
        sup.exit_if_failed()
    assert recorder.exits == [EXIT_THREAD_DIED] == [70]


def test_only_the_first_death_stops_the_process_and_every_one_is_reported() -> None:
    recorder = Recorder()
    sup, stop = supervisor(recorder), threading.Event()

    def failing(stop: threading.Event) -> None:
        raise ValueError("broken")

    for name in ("budget-projector", "event-archive"):
        sup.start(name, failing, stop).join(5)
    assert recorder.stops == 1
    assert sorted(recorder.reports) == [("budget-projector", "ValueError"),
                                        ("event-archive", "ValueError")]


def test_a_thread_that_returns_while_the_process_runs_is_a_death_but_not_after_stop() -> None:
    recorder = Recorder()
    sup, stop = supervisor(recorder), threading.Event()
    sup.start("rollup-sealer", lambda stop: None, stop).join(5)
    assert recorder.reports == [("rollup-sealer", "WorkerThreadStopped")]

    calm, quiet = Recorder(), threading.Event()
    quiet.set()
    sup = supervisor(calm)
    sup.start("rollup-sealer", lambda stop: None, quiet).join(5)
    sup.exit_if_failed()
    assert calm.reports == [] and calm.exits == []


def test_a_stop_that_hangs_is_cut_short_by_the_watchdog() -> None:
    recorder = Recorder()
    sup, stop = supervisor(recorder, grace=0.1), threading.Event()

    def failing(stop: threading.Event) -> None:
        raise RuntimeError("gone")

    sup.start("cost-sink", failing, stop)
    assert recorder.exited.wait(5)  # nobody called exit_if_failed: the watchdog did
    assert recorder.exits == [70]


def test_a_probe_that_keeps_failing_is_a_death() -> None:
    recorder = Recorder()
    sup, stop = supervisor(recorder), threading.Event()
    answers = iter([True, False, True, False, False, False])
    thread = sup.watch("query-endpoint", lambda: next(answers), stop, every=0.01, misses=3)
    thread.join(5)
    assert recorder.reports == [("query-endpoint", "WorkerThreadStopped")]
    assert isinstance(sup.failure and sup.failure[1], WorkerThreadStopped)
    stop.set()


class FailingClient:
    """Every query fails with ``error`` ``times`` times, then returns no rows."""

    def __init__(self, error: BaseException, times: int) -> None:
        self.error, self.times, self.calls = error, times, 0

    def query(self, sql: str, parameters: Any = None) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error

        class Empty:
            result_rows: tuple[Any, ...] = ()

        return Empty()


def test_the_sealer_retries_a_failed_round_at_the_next_tick() -> None:
    client = FailingClient(OperationalError("Error executing HTTP request"), times=2)
    sealer = Sealer(client, "db", interval=0.001, today=lambda: date(2026, 1, 2),
                    max_failures=3)
    stop = threading.Event()
    thread = threading.Thread(target=sealer.run, args=(stop,))
    thread.start()
    while client.calls < 5:
        thread.join(0.01)
        assert thread.is_alive()
    stop.set()
    thread.join(5)


def test_the_sealer_gives_up_after_max_failures_rounds_in_a_row() -> None:
    client = FailingClient(OperationalError("Error executing HTTP request"), times=100)
    sealer = Sealer(client, "db", interval=0.001, today=lambda: date(2026, 1, 2),
                    max_failures=3)
    with pytest.raises(RollupSealError, match="failed 3 rounds in a row"):
        sealer.run(threading.Event())
    assert client.calls == 3


def test_the_sealer_stops_at_once_on_a_fatal_engine_error() -> None:
    client = FailingClient(DatabaseError(
        "Code: 236. DB::Exception: The server is shutting down due to a fatal error. (ABORTED)",
        code=236), times=100)
    sealer = Sealer(client, "db", interval=0.001, today=lambda: date(2026, 1, 2))
    with pytest.raises(RollupSealError, match="fatal engine error"):
        sealer.run(threading.Event())
    assert client.calls == 1


def test_sealed_rows_are_inserted_a_bounded_number_of_months_at_a_time() -> None:
    days = [date(2020, m, d) for m in (5, 1, 3, 2, 4) for d in (1, 15)]
    chunks = list(by_months([[day, "c"] for day in days], months=2))
    assert [sorted({(r[0].year, r[0].month) for r in c}) for c in chunks] == [
        [(2020, 1), (2020, 2)], [(2020, 3), (2020, 4)], [(2020, 5)]]
    assert sum(len(c) for c in chunks) == len(days)
