"""Stability's Stable Image REST API through httpx against the local fake.

Loopback only: the fake listens on 127.0.0.1 in this process; nothing leaves the machine.
"""

import asyncio
import hashlib
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, OperationCompleted
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.outputs import StoringProvider
from aipipe.streams.generation.provider import ProviderError
from aipipe.streams.generation.stability import StabilityProvider
from tests.support.fake_stability import FakeStability, image_bytes
from tests.support.raw_http import canned, run_against

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
PROMPT = "a lighthouse at dawn, watercolour"


@pytest.fixture
def fake() -> Iterator[FakeStability]:
    with FakeStability() as server:
        yield server


def provider(fake: FakeStability) -> StabilityProvider:
    return StabilityProvider(api_key=SecretStr("sk-stab-123"), base_url=fake.base_url,
                             timeout_seconds=5)


def op(model: str, **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=NOW,
        operation_type="image_generation", provider="stability", model=model,
        params={"prompt": PROMPT, **params},
    )


def run(fake: FakeStability, store: LocalArtifactStore, operation: OperationAdmitted,
        attempts: int = 1) -> OperationCompleted:
    gen = Generation({"stability": StoringProvider(provider(fake), store)},
                     ProviderGuard(retry=RetryPolicy(attempts, 0, 0)), PollSchedule())
    [done] = asyncio.run(gen.run(operation))
    assert isinstance(done, OperationCompleted)
    return done


@pytest.mark.parametrize(("model", "endpoint", "credits"), [
    ("stable-image-ultra", "ultra", "8"),
    ("stable-image-core", "core", "3"),
    ("sd3.5-large", "sd3", "6.5"),
    ("sd3.5-large-turbo", "sd3", "4"),
    ("sd3.5-medium", "sd3", "3.5"),
])
def test_each_model_costs_its_credits_per_image_and_its_png_is_stored(
    fake: FakeStability, tmp_path: Path, model: str, endpoint: str, credits: str
) -> None:
    store = LocalArtifactStore(tmp_path)
    done = run(fake, store, op(model, aspect_ratio="16:9", seed=7))
    assert done.success, done.error_message
    assert done.usage.image_count == 1
    assert done.cost_usd == Decimal(credits) / 100
    png = image_bytes(PROMPT)
    [output] = done.outputs
    assert (output.mime_type, output.size, output.sha256) == (
        "image/png", len(png), hashlib.sha256(png).hexdigest())
    assert asyncio.run(store.get(output.uri)) == png
    [call] = fake.requests
    assert call.path == f"/v2beta/stable-image/generate/{endpoint}"
    assert call.headers["authorization"] == "Bearer sk-stab-123"
    assert call.headers["accept"] == "image/*"
    expected = {"prompt": PROMPT, "aspect_ratio": "16:9", "seed": "7"}
    if endpoint == "sd3":
        expected["model"] = model
    assert {k: v for k, v in call.body.items() if k != "none"} == expected


def test_a_filtered_image_is_a_failed_operation_that_costs_nothing(
    fake: FakeStability, tmp_path: Path
) -> None:
    fake.filtered.add(PROMPT)
    done = run(fake, LocalArtifactStore(tmp_path), op("stable-image-core"))
    assert not done.success and done.cost_usd == 0 and done.outputs == []
    assert done.metadata["finish_reason"] == "CONTENT_FILTERED"


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (403, False), (404, False),
    (429, True), (500, True), (503, True),
])
def test_statuses_map_to_retryable_or_not(
    fake: FakeStability, status: int, retryable: bool
) -> None:
    fake.fail_next("core", status)
    with pytest.raises(ProviderError) as caught:
        asyncio.run(provider(fake).generate_image(op("stable-image-core")))
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert "sk-stab-123" not in str(caught.value)


def test_a_retryable_failure_is_retried_and_completes(
    fake: FakeStability, tmp_path: Path
) -> None:
    fake.fail_next("ultra", 503)
    done = run(fake, LocalArtifactStore(tmp_path), op("stable-image-ultra"), attempts=2)
    assert done.success and [c.status for c in fake.requests] == [503, 200]


def test_an_unknown_model_fails_without_a_call(fake: FakeStability, tmp_path: Path) -> None:
    done = run(fake, LocalArtifactStore(tmp_path), op("sdxl-1.0"))
    assert not done.success and done.metadata["status"] == 404 and fake.requests == []


def test_a_timeout_is_retryable() -> None:
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        slow = StabilityProvider(api_key=SecretStr("k"), base_url=f"http://{host}:{port}",
                                 timeout_seconds=0.3)
        with pytest.raises(ProviderError) as caught:
            asyncio.run(slow.generate_image(op("stable-image-core")))
    assert caught.value.retryable and caught.value.status is None


def hostile(head: bytes, drip: bytes = b"", timeout: float = 1.0) -> tuple[Any, float]:
    """One image call against a local server that answers ``head``, then ``drip`` a byte
    every 0.1 s: the provider's error (or result) and how long the call took."""
    def call(base: str) -> Awaitable[Any]:
        slow = StabilityProvider(api_key=SecretStr("k"), base_url=base, timeout_seconds=timeout)
        return slow.generate_image(op("stable-image-core"))

    return run_against(canned(head, drip), call, (ProviderError,))


def test_an_answer_that_drips_is_cut_off_at_the_timeout_for_the_whole_answer() -> None:
    """httpx's timeout is per read: a byte every 0.1 s would have taken 100 s."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    error, seconds = hostile(head, drip=b"x" * 1000)
    assert isinstance(error, ProviderError) and error.retryable
    assert str(error) == "stability core: timeout" and seconds < 10


def test_an_answer_past_the_size_limit_is_refused_before_it_is_read() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 99999999999\r\n\r\n"
    error, seconds = hostile(head, timeout=30)
    assert isinstance(error, ProviderError) and not error.retryable
    assert "past the 67108864-byte limit" in str(error) and seconds < 10


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (502, True), (400, False)])
def test_an_error_answer_past_the_size_limit_is_decided_by_its_status(
    status: int, retryable: bool
) -> None:
    """A proxy's 503 page of 70 KB was refused as too large, not retried, and not counted
    by the breaker."""
    page = b"<html>" + b"x" * 70_000 + b"</html>"
    head = (f"HTTP/1.1 {status} Oops\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(page)}\r\n\r\n").encode() + page
    error, _ = hostile(head, timeout=30)
    assert isinstance(error, ProviderError)
    assert (error.status, error.retryable) == (status, retryable)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 15\r\n\r\n<html>hi</html>",
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 8\r\n\r\nnot gzip",
    b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 0\r\n\r\n",
], ids=["html-page", "body-not-gzip", "empty"])
def test_a_200_that_is_not_an_image_is_a_retryable_failure_not_a_billed_image(
    head: bytes
) -> None:
    """What a wrong base URL or a proxy answers: the breaker counts it, nothing is billed."""
    error, _ = hostile(head, timeout=30)
    assert isinstance(error, ProviderError) and error.retryable
