"""In production every line a worker writes is one JSON object: structlog's own, faust's,
mode's, aiokafka's, librdkafka's, Python warnings, and tracebacks as a field, never loose.

A real ``aipipe run all`` process (faust and the cost sink in one process) runs at debug
level, so faust, mode and aiokafka log plenty while starting. A ``sitecustomize`` on its
``PYTHONPATH`` makes the interpreter warn, and a thread raise, right after the worker's
logging is set up; ``AIPIPE_FAULT=sink_raise@2`` makes the cost sink's thread raise, which
takes the process down with exit 70 (the events reach it once faust has begun to log).
Then every line of its output must parse.
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.infra.supervise import EXIT_THREAD_DIED
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers.producer import DeliveryError, EventProducer
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationCompleted, Usage
from tests.support.pipeline import produce

pytestmark = pytest.mark.e2e

# runs in the worker at interpreter start: once the worker turns on captureWarnings (in
# configure_logging, after its handlers are set), warn and let a plain thread raise
SITECUSTOMIZE = '''
import logging, threading, warnings

_capture = logging.captureWarnings

def captureWarnings(capture):
    _capture(capture)
    if capture:
        warnings.warn("a warning inside the worker", UserWarning, stacklevel=1)
        thread = threading.Thread(target=lambda: 1 / 0, name="doomed")
        thread.start()
        thread.join()

logging.captureWarnings = captureWarnings
'''


def completed(n: int) -> OperationCompleted:
    return OperationCompleted(
        request_id=f"req-{n}", client_id="acme", operation_id=f"op-{n}",
        requested_at=datetime.now(UTC), operation_type="image_generation",
        provider="simulated", model="gemini-2.5-flash-image", success=True,
        usage=Usage(input_tokens=10, image_count=1), cost_usd=Decimal("0.0387"),
        price_version="2025-10-01", duration_ms=100)


def records(path: Path) -> list[dict[str, Any]]:
    """Each non-empty line of ``path`` as the JSON object it must be."""
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} of the worker's output is not JSON: {line[:300]!r}")
        assert isinstance(record, dict), line
        assert {"event", "level", "timestamp"} <= record.keys(), line
        found.append(record)
    return found


def test_every_line_a_worker_writes_is_json(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    settings = settings.model_copy(update={"sink_batch_size": 5, "sink_batch_seconds": 0.2})
    prepare_topics(settings)

    worker = WorkerProcess(settings, "all").start(log_level="debug", fault="sink_raise@2")
    try:
        def libraries_logged() -> bool:
            assert worker.alive(), worker.log_tail()
            text = worker.log_path.read_text(errors="replace")
            return all(f'"logger": "{name}.' in text for name in ("faust", "mode", "aiokafka"))

        wait_for(libraries_logged, 120, "faust's, mode's and aiokafka's first lines")
        # only now: the sink would otherwise die on them before faust has said anything
        produce(settings, settings.topics.completed, [completed(n) for n in range(20)])
        assert worker.wait_exit(120) == EXIT_THREAD_DIED, worker.log_tail()
    finally:
        worker.kill()
    lines = records(worker.log_path)

    loggers = {str(r.get("logger")).split(".")[0] for r in lines}
    assert {"faust", "mode", "aiokafka", "py"} <= loggers, loggers
    [warned] = [r for r in lines if r.get("logger") == "py.warnings"]
    assert warned["level"] == "warning"
    assert "UserWarning: a warning inside the worker" in warned["event"]
    [raised] = [r for r in lines if r["event"] == "thread_exception"]
    assert raised["thread"] == "doomed" and raised["error"] == "ZeroDivisionError: division by zero"
    assert raised["exception"].startswith("Traceback (most recent call last):")
    [died] = [r for r in lines if r["event"] == "worker_thread_died"]
    assert died["thread"] == "cost-sink" and "Traceback" in died["exception"]
    assert not [r for r in lines if "Traceback (most recent" in r["event"]]


def test_librdkafka_lines_go_to_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    producer = EventProducer(f"127.0.0.1:{closed}")
    producer.send("nowhere", completed(0))
    with caplog.at_level(logging.WARNING, logger="aipipe.librdkafka"),\
            pytest.raises(DeliveryError):
        producer.flush(2.0)
    [first, *_] = [r for r in caplog.records if r.name == "aipipe.librdkafka"]
    assert first.levelno == logging.ERROR
    assert "FAIL [rdkafka#producer-" in first.getMessage()
    assert f"127.0.0.1:{closed}" in first.getMessage() and "refused" in first.getMessage()


def test_a_worker_that_cannot_start_says_so_in_json(settings: Settings) -> None:
    with socket.socket() as taken:  # its metrics port is held by someone else
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess(settings, "costs").start(metrics_port=str(port),
                                                        metrics_host="127.0.0.1")
        assert worker.wait_exit(120) == 2, worker.log_tail()
    [failed] = [r for r in records(worker.log_path) if r["event"] == "worker_failed"]
    assert failed["role"] == "costs" and failed["level"] == "error"
    assert failed["error"].startswith(f"AIPIPE_METRICS_PORT={port} cannot be served")
