"""A worker started by ``WorkerProcess`` ends with the process that started it, even when
that process is killed at once (SIGKILL leaves it no ``finally`` to stop its workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import wait_for
from tests.e2e.test_metrics import free_port

pytestmark = pytest.mark.e2e

# the parent: starts a cost worker, says its pid, and waits to be killed
PARENT = """
import sys
from aipipe.infra.settings import load_settings
from aipipe.processes import WorkerProcess
worker = WorkerProcess(load_settings(), "costs").start()
print(worker.pid, flush=True)
sys.stdin.read()
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie until init reaps it
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_a_worker_stops_when_the_process_that_started_it_is_killed(settings: Settings) -> None:
    settings = settings.model_copy(update={"metrics_port": free_port()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env={**env, **settings.to_env()},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    log = settings.home / f"worker-{settings.topic_prefix}-costs.log"
    try:
        # ready: past setting the parent-death signal (its first step) and its own
        # SIGTERM handler
        wait_for(lambda: answers(f"http://127.0.0.1:{settings.metrics_port}/readyz"), 120,
                 "the cost worker's /readyz")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not running(worker), 60, "the orphaned worker's end")
        assert '"event": "worker_stopped"' in log.read_text()  # a clean stop, on SIGTERM
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)
