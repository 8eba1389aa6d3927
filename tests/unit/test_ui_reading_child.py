"""The UI's one-shot reading child (``aipipe.ui._read_in_child``): a child that does not
answer within the limit is stopped, and the page gets one sentence instead of waiting; a
request that waits too long for another's child gets one sentence too (``Reads``)."""

import os
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import aipipe.ui
from aipipe.infra.settings import Settings
from aipipe.ui import Busy, Reads, UiError, _read_in_child


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


def test_a_read_that_waits_too_long_for_anothers_child_is_busy(tmp_path: Path) -> None:
    """No pipeline serves the path, and another request's child holds it: this request
    waits ``wait`` seconds, then gets ``Busy`` (a 503) instead of queueing on."""
    reads = Reads(Settings(home=tmp_path), wait=0.2)
    assert reads._child.acquire(blocking=False)  # another request's child reads the path
    try:
        started = time.monotonic()
        with pytest.raises(Busy) as caught:
            reads("summary")
        assert 0.2 <= time.monotonic() - started < 10
    finally:
        reads._child.release()
    assert str(caught.value) == (
        "Another read of the chDB path is still running after 0.2 s (one runs at a time while "
        "no pipeline serves the path); refresh once it ends.")


def test_the_child_lock_is_let_go_of_when_a_read_fails(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: Any) -> dict[str, Any]:
        raise UiError("The read of the chDB path ended without an answer.")

    monkeypatch.setattr(aipipe.ui, "_read_in_child", failing)
    reads = Reads(Settings(home=tmp_path), wait=0.2)
    with pytest.raises(UiError, match="without an answer"):
        reads("summary")
    assert reads._child.acquire(blocking=False)
