"""A command ends without the exit handlers once chDB is loaded (``aipipe.infra.leave``).

chDB's teardown at exit sometimes waits forever on its own mutex: ``aipipe sql`` on an
embedded path hung at exit in 2 of 25 runs, and the UI's reading child hung the same way.
Here an exit handler that would hang stands in for chDB's: the command must end anyway,
with its status and its output flushed; without chDB loaded, the handlers still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMMAND = r"""
import atexit, sys, threading
if sys.argv[1] == "chdb":
    import chdb  # noqa: F401  (loaded, as by any command that opened the embedded path)
atexit.register(lambda: (print("handlers ran", flush=True), threading.Event().wait(600)))
from aipipe.cli import main
sys.argv = ["aipipe", *sys.argv[2:]]
main()
"""


def run(loaded: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command; a hang in the handlers shows as ``TimeoutExpired``."""
    return subprocess.run(
        [sys.executable, "-c", COMMAND, loaded, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["--help"], 0, "Usage: aipipe"),
        (["no-such-command"], 2, "No such command"),
    ],
)
def test_with_chdb_loaded_a_command_ends_with_its_status_and_output(
    args: list[str], code: int, said: str
) -> None:
    done = run("chdb", *args)
    assert done.returncode == code, done.stderr[-2000:]
    assert said in done.stdout + done.stderr
    assert "handlers ran" not in done.stdout


def test_without_chdb_the_exit_handlers_run() -> None:
    quick = COMMAND.replace("threading.Event().wait(600)", "None")
    done = subprocess.run(
        [sys.executable, "-c", quick, "no", "--help"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.count("handlers ran")) == (0, 1), done.stderr[-2000:]


FAILING = r"""
import sys
import chdb  # noqa: F401
from aipipe.cli import cli, main, pass_ctx

@cli.command("boom")
@pass_ctx
def boom(ctx):
    ctx.settings  # logging set up, as by every command that reads its settings
    raise RuntimeError("boom")

sys.argv = ["aipipe", "boom"]
main()
"""


def test_a_bug_in_a_command_is_reported_as_an_uncaught_error_and_ends_with_1() -> None:
    """Through ``sys.excepthook``: one JSON line (and Sentry, when set up), not loose text."""
    done = subprocess.run([sys.executable, "-c", FAILING], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "AIPIPE_ENV": "production"})
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(x["event"], x["error"]) for x in lines] == [
        ("uncaught_exception", "RuntimeError: boom")]
