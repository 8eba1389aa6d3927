"""The UI's one-shot reading child (``aipipe.ui._read_in_child``): a child that does not
answer within the limit is stopped, and the page gets one sentence instead of waiting."""

import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.ui import UiError, _read_in_child


def stuck(sender: Connection, settings: Settings, method: str, args: tuple[Any, ...]) -> None:
    """A child whose read never ends (in place of chDB stuck on its path); it leaves its pid."""
    (settings.home / "stuck.pid").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(60)


def answering(sender: Connection, settings: Settings, method: str,
              args: tuple[Any, ...]) -> None:
    sender.send(("ok", {"method": method, "args": list(args)}))
    sender.close()


def test_a_child_that_does_not_answer_in_time_is_stopped(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    started = time.monotonic()
    with pytest.raises(UiError, match=r"took longer than 3 s, so it was stopped; narrow"):
        _read_in_child(settings, "summary", (), limit=3.0, target=stuck)
    assert time.monotonic() - started < 60  # the limit, with room for a slow spawn
    pid = int((tmp_path / "stuck.pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped: it keeps no path open
        os.kill(pid, 0)


def test_an_answer_within_the_limit_is_returned(tmp_path: Path) -> None:
    answer = _read_in_child(Settings(home=tmp_path), "operations", ("acme",), limit=60.0,
                            target=answering)
    assert answer == {"method": "operations", "args": ["acme"]}
