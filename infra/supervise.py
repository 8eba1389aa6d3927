"""Supervision of a worker process's long-running threads: each recovers, or the process ends.

A thread that must keep running (a sink, the rollup sealer, a probe of the read endpoint)
is started through ``Supervisor.start``. Its own error policy handles what it can recover
from (retries, dead letters); anything that escapes it, or a thread that returns while
the process is still meant to run, is a death: one ``worker_thread_died`` error line
(thread name, error, traceback), a Sentry event tagged with the thread, and then the
process goes down. First cleanly: ``request_stop`` (in ``aipipe run``, SIGTERM to itself,
which both roles already treat as "stop"), the other threads stop and flush, and
``exit_if_failed`` ends the process with ``EXIT_THREAD_DIED``. If that does not finish
within ``grace_seconds`` (a thread stuck in a broken engine), a watchdog ends it with the
same code. A process supervisor (systemd, Kubernetes, docker-compose ``restart:``) then
starts a fresh one, which resumes from the committed offsets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NoReturn

import structlog

from aipipe.infra.leave import end_now, flush_reports
from aipipe.infra.logging import report_exception
from aipipe.infra.metrics import HEALTH
from aipipe.schemas.errors import AipipeError

log = structlog.get_logger("aipipe.supervise")

EXIT_THREAD_DIED = 70  # EX_SOFTWARE (sysexits.h): an internal error, restart the process


class WorkerThreadStopped(AipipeError):
    """A supervised thread returned, or a probe failed, while the process was running."""


class Supervisor:
    def __init__(
        self,
        *,
        request_stop: Callable[[], None],
        grace_seconds: float = 20.0,
        report: Callable[[BaseException, str], None] = lambda exc, name: report_exception(
            exc, thread=name),
        exit: Callable[[int], NoReturn] = end_now,
    ) -> None:
        self.request_stop = request_stop
        self.grace_seconds = grace_seconds
        self.report = report
        self.exit = exit
        self.failure: tuple[str, BaseException] | None = None
        self._lock = threading.Lock()
        self._watchdog: threading.Timer | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def start(
        self, name: str, target: Callable[[threading.Event], None], stop: threading.Event
    ) -> threading.Thread:
        """Run ``target(stop)`` in a daemon thread called ``name``, watched."""
        thread = threading.Thread(target=self._run, args=(name, target, stop), name=name,
                                  daemon=True)
        thread.start()
        return thread

    def watch(
        self, name: str, probe: Callable[[], bool], stop: threading.Event, *,
        every: float = 5.0, misses: int = 3,
    ) -> threading.Thread:
        """Call ``probe`` every ``every`` seconds; ``misses`` failures in a row are a death
        of ``name`` (for a part whose thread is not ours to wrap, e.g. the read endpoint)."""

        def probing(stop: threading.Event) -> None:
            missed = 0
            while not stop.wait(every):
                try:
                    answered = probe()
                except Exception:
                    answered = False
                missed = 0 if answered else missed + 1
                if missed:
                    log.warning("worker_probe_failed", thread=name, missed=missed, of=misses)
                if missed >= misses:
                    raise WorkerThreadStopped(
                        f"{name} did not answer {missed} probes in a row, {every:g} s apart.")

        return self.start(name, probing, stop)

    def _run(self, name: str, target: Callable[[threading.Event], None],
             stop: threading.Event) -> None:
        try:
            target(stop)
        except BaseException as exc:  # whatever it was, the process must know
            self.died(name, exc)
            return
        if not stop.is_set():
            self.died(name, WorkerThreadStopped(
                f"Thread {name} returned while the process was still running."))

    def died(self, name: str, exc: BaseException) -> None:
        """Log and report the death of ``name``; the first one stops the process."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = (name, exc)
        HEALTH.died(name)  # /healthz fails at once, naming the thread
        log.error("worker_thread_died", thread=name, error=f"{type(exc).__name__}: {exc}",
                  exit_code=EXIT_THREAD_DIED, exc_info=exc)
        self.report(exc, name)
        if not first:
            return
        flush_reports()  # before anything else can stall
        self._watchdog = threading.Timer(self.grace_seconds, self._force_exit)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.request_stop()

    def _force_exit(self) -> None:
        log.error("worker_exit_forced", grace_seconds=self.grace_seconds,
                  exit_code=EXIT_THREAD_DIED)
        flush_reports(timeout=2.0)
        self.exit(EXIT_THREAD_DIED)

    def exit_if_failed(self) -> None:
        """End the process with ``EXIT_THREAD_DIED`` if a supervised thread died."""
        if self.failure is None:
            return
        name, exc = self.failure
        log.error("worker_exiting", thread=name, error=f"{type(exc).__name__}: {exc}",
                  exit_code=EXIT_THREAD_DIED)
        flush_reports()
        self.exit(EXIT_THREAD_DIED)
