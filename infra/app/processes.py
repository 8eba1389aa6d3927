"""Start and stop ``aipipe run`` worker processes (for the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aipipe.infra.settings import Settings


class WorkerProcess:
    """One ``aipipe run ROLE`` child process with the given settings."""

    def __init__(self, settings: Settings, role: str = "all", log_path: Path | None = None) -> None:
        self.settings = settings
        self.role = role
        self.log_path = log_path or settings.home / f"worker-{settings.topic_prefix}-{role}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **overrides: str) -> WorkerProcess:
        """Start the worker; it stops when this process (or the thread that called this)
        ends, even when killed at once (``AIPIPE_PARENT_PID``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
        env.update(self.settings.to_env())
        env["AIPIPE_PARENT_PID"] = str(os.getpid())
        env.update({f"AIPIPE_{k.upper()}": v for k, v in overrides.items()})
        env["AIPIPE_ENV"] = "production"  # JSON lines in the log file
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aipipe", "run", self.role],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the worker was not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        if self.wait_exit(timeout) is None:
            self.kill()

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll ``condition`` until it holds; raise ``TimeoutError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
