"""The emitter gets its result back: ``submit()`` and ``aipipe result`` against a real
``aipipe run streams`` worker (simulated provider) on the local Kafka.

Every wait is a future or a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess
from aipipe.producers import EventProducer
from aipipe.producers.results import ResultClient, ResultTimeout
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationCompleted, OperationRejected, OperationRequested, decode
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation.png import solid_png

pytestmark = pytest.mark.e2e
IMAGE = "gemini-2.5-flash-image"


def requested(n: int, **params: Any) -> OperationRequested:
    return OperationRequested(
        request_id=f"req-{uuid.uuid4()}", client_id=f"client-{n % 5}", provider="simulated",
        operation_type="image_generation", model=IMAGE,
        params={"prompt": f"a lighthouse, take {n}", **params},
    )


def expected_png(request: OperationRequested) -> bytes:
    """What the simulated provider draws for the request (see ``simulated_png``)."""
    return solid_png(f"{request.model}\n{request.params['prompt']}\n0".encode())


def aipipe(
    settings: Settings, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "aipipe", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_resolves_for_100_concurrent_requests_and_aipipe_result_returns_outputs(
    settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"simulated_latency_ms": 100})
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    try:
        requests = [requested(n) for n in range(100)]
        invalid = requested(100, colour="blue")  # a key the provider does not take

        async def submit_all(results: ResultClient) -> list[Any]:
            return await asyncio.gather(*(results.submit(r, timeout=180)
                                          for r in [*requests, invalid]))

        with ResultClient(settings.kafka_bootstrap, settings.topics) as results:
            *outcomes, refused = asyncio.run(submit_all(results))
            with pytest.raises(ResultTimeout, match=r"aipipe result \S+ --client client-1 --wait"):
                asyncio.run(results.submit(requested(101, simulate={"latency_ms": 3000}),
                                           timeout=0.5))
            blocking = results.submit_blocking(requested(102), timeout=120)
            # another client using the same event_id: each gets its own outcome
            mine = requested(104)
            twin = mine.model_copy(update={"client_id": "twin",
                                           "params": {"prompt": "a lighthouse at night"}})


            async def both() -> list[Any]:
                return await asyncio.gather(results.submit(mine, timeout=120),
                                            results.submit(twin, timeout=120))

            pair = asyncio.run(both())

        assert isinstance(refused, OperationRejected) and refused.reason == "invalid"
        assert isinstance(blocking, OperationCompleted) and blocking.success
        store = LocalArtifactStore(settings.home / "artifacts")
        for request, outcome in zip(requests, outcomes, strict=True):
            assert isinstance(outcome, OperationCompleted) and outcome.success
            assert outcome.operation_id == request.event_id
            [output] = outcome.outputs
            png = expected_png(request)
            assert (output.sha256, output.size) == (hashlib.sha256(png).hexdigest(), len(png))
            assert asyncio.run(store.get(output.uri)) == png

        # the CLI: an outcome from history, its outputs written out
        first = requests[0]
        shown = aipipe(settings, "result", first.event_id, "--out", str(tmp_path / "out"))
        assert shown.returncode == 0, shown.stderr
        assert decode(shown.stdout.encode()) == outcomes[0]
        [written] = (tmp_path / "out").iterdir()
        assert written.name == f"{first.event_id}-0.png"
        assert written.read_bytes() == expected_png(first)
        by_request = aipipe(settings, "result", invalid.request_id)
        assert by_request.returncode == 0 and decode(by_request.stdout.encode()) == refused

        for request, outcome in zip((mine, twin), pair, strict=True):
            assert isinstance(outcome, OperationCompleted) and outcome.client_id == \
                request.client_id
            assert asyncio.run(store.get(outcome.outputs[0].uri)) == expected_png(request)
        assert pair[0].event_id != pair[1].event_id  # (a webhook receiver dedups by it)
        of_twin = aipipe(settings, "result", mine.event_id, "--client", "twin")
        assert of_twin.returncode == 0 and decode(of_twin.stdout.encode()) == pair[1]

        missing = aipipe(settings, "result", "no-such-operation")
        assert missing.returncode == 1 and "add --wait" in missing.stderr

        # --wait: the outcome of a request emitted while the command waits
        later = requested(103)
        waiting = subprocess.Popen(
            [sys.executable, "-m", "aipipe", "result", later.event_id, "--wait",
             "--timeout", "120"],
            env={**settings.to_env(), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with EventProducer(settings.kafka_bootstrap) as producer:
            producer.send(settings.topics.requested, later)
        stdout, stderr = waiting.communicate(timeout=180)
        assert waiting.returncode == 0, stderr
        done = decode(stdout.encode())
        assert isinstance(done, OperationCompleted) and done.operation_id == later.event_id
    finally:
        worker.stop()
