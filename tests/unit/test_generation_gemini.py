"""The real google-genai SDK against the local fake of the Gemini and Vertex endpoints.

Loopback only: the fake listens on 127.0.0.1 in this process; nothing leaves the machine.
"""

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
)
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.gemini import GeminiProvider
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.provider import ProviderError
from tests.support.fake_gemini import PNG, FakeGemini, prompt_tokens
from tests.support.raw_http import run_against

NOW = datetime(2026, 11, 26, tzinfo=UTC)
VEO = "veo-3.0-generate-001"


@pytest.fixture
def fake() -> Iterator[FakeGemini]:
    with FakeGemini(video_polls=3) as server:
        yield server


def provider(fake: FakeGemini) -> GeminiProvider:
    return GeminiProvider(
        api_key=SecretStr("test-key-123"), base_url=fake.base_url, vertex_project="proj-1",
        vertex_location="us-central1", vertex_access_token=SecretStr("test-token-456"),
        video_output_buckets=("fake-bucket",),
    )


def op(operation_type: str, model: str, **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=NOW,
        operation_type=operation_type, provider="gemini",  # type: ignore[arg-type]
        model=model, params={"prompt": "a lighthouse at dawn, watercolour", **params},
    )


def test_an_image_is_generate_content_with_usage_from_usage_metadata(fake: FakeGemini) -> None:
    gen = Generation({"gemini": provider(fake)}, ProviderGuard(), PollSchedule())
    [done] = asyncio.run(gen.run(op("image_generation", "gemini-2.5-flash-image")))
    assert isinstance(done, OperationCompleted) and done.success
    tokens_in = prompt_tokens("a lighthouse at dawn, watercolour")
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.image_count) == (
        tokens_in, 1290, 1)
    assert done.cost_usd == (tokens_in * Decimal("0.30") + 1290 * Decimal(30)) / 1_000_000
    [call] = fake.requests
    assert (call.method, call.path) == ("POST",
                                        "/v1/models/gemini-2.5-flash-image:generateContent")
    assert call.headers["x-goog-api-key"] == "test-key-123"
    assert call.body["generationConfig"] == {"responseModalities": ["IMAGE"]}
    assert call.body["contents"][0]["parts"][0]["text"].startswith("a lighthouse")


def test_a_video_starts_on_vertex_and_is_polled_by_operation_name(fake: FakeGemini) -> None:
    gemini = provider(fake)
    gen = Generation({"gemini": gemini}, ProviderGuard(), PollSchedule())
    # (the fake writes its videos at the top of fake-bucket)
    started, first = asyncio.run(gen.run(op("video_generation", VEO, duration_seconds=6,
                                            output_gcs_uri="gs://fake-bucket/")))
    assert isinstance(started, VideoStarted) and isinstance(first, VideoPollScheduled)
    assert started.job == {"duration_seconds": 6, "output_gcs_uri": "gs://fake-bucket/"}
    prefix = f"projects/proj-1/locations/us-central1/publishers/google/models/{VEO}"
    assert started.provider_operation.startswith(f"{prefix}/operations/")
    [start] = fake.calls("predictLongRunning")
    assert start.path == f"/v1beta1/{prefix}:predictLongRunning"
    assert start.headers["Authorization"] == "Bearer test-token-456"
    assert start.body == {"instances": [{"prompt": "a lighthouse at dawn, watercolour"}],
                          "parameters": {"sampleCount": 1, "durationSeconds": 6,
                                         "storageUri": "gs://fake-bucket/"}}

    # a fresh provider (a restarted worker) polls from the event alone
    again = Generation({"gemini": provider(fake)}, ProviderGuard(), PollSchedule())
    outcomes = [asyncio.run(again.poll(started, n)) for n in (1, 2, 3)]
    assert [type(e) for e in outcomes[0]] == [VideoPolled, VideoPollScheduled]
    done = outcomes[2][0]
    assert isinstance(done, OperationCompleted) and done.success and done.poll_count == 3
    assert done.usage.video_seconds == Decimal(6) and done.cost_usd == Decimal("2.4")
    polls = fake.calls("fetchPredictOperation")
    assert [p.body for p in polls] == [{"operationName": started.provider_operation}] * 3
    assert {p.path for p in polls} == {f"/v1beta1/{prefix}:fetchPredictOperation"}
    assert len(fake.calls("predictLongRunning")) == 1


def test_503s_are_retried_within_the_cap_and_end_in_one_result(fake: FakeGemini) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    fake.fail_next("generateContent", 503, 503, 429)
    guard = ProviderGuard(retry=RetryPolicy(attempts=5, base=0.5, cap=1.0), sleep=sleep)
    gen = Generation({"gemini": provider(fake)}, guard, PollSchedule())
    [done] = asyncio.run(gen.run(op("text_generation", "gemini-2.5-flash",
                                    max_output_tokens=50)))
    assert isinstance(done, OperationCompleted) and done.success
    assert done.usage.output_tokens == fake.text_tokens
    assert [r.status for r in fake.requests] == [503, 503, 429, 200]
    assert len(slept) == 3 and all(0.25 <= s <= 1.0 for s in slept)


def test_a_403_on_poll_is_a_permanent_error(fake: FakeGemini) -> None:
    gemini = provider(fake)
    job = asyncio.run(gemini.start_video(op("video_generation", VEO)))
    fake.fail_next("fetchPredictOperation", 403)
    with pytest.raises(ProviderError) as raised:
        asyncio.run(gemini.poll_video(VEO, job, 1))
    assert (raised.value.status, raised.value.retryable) == (403, False)
    assert "PERMISSION_DENIED" in str(raised.value)


def test_missing_configuration_is_a_permanent_error_naming_the_variable() -> None:
    gemini = GeminiProvider(base_url="http://127.0.0.1:9")
    with pytest.raises(ProviderError, match="AIPIPE_VERTEX_PROJECT"):
        asyncio.run(gemini.start_video(op("video_generation", VEO)))
    with pytest.raises(ProviderError, match="AIPIPE_GEMINI_API_KEY"):
        asyncio.run(gemini.generate_image(op("image_generation", "gemini-2.5-flash-image")))


def test_keys_stay_out_of_the_provider_repr(fake: FakeGemini) -> None:
    text = repr(provider(fake))
    assert "test-key-123" not in text and "test-token-456" not in text


def test_the_image_bytes_are_kept_and_a_veo_video_in_its_bucket_is_referenced(
    fake: FakeGemini, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path)
    gemini = GeminiProvider(
        api_key=SecretStr("k"), base_url=fake.base_url, vertex_project="proj-1",
        vertex_access_token=SecretStr("t"), video_output_buckets=("fake-bucket",),
    )
    gen = Generation({"gemini": gemini}, ProviderGuard(), PollSchedule(), artifacts=store)
    [image] = asyncio.run(gen.run(op("image_generation", "gemini-2.5-flash-image")))
    assert isinstance(image, OperationCompleted) and image.success
    png = base64.b64decode(PNG)
    [output] = image.outputs
    assert (output.mime_type, output.sha256) == ("image/png", hashlib.sha256(png).hexdigest())
    assert asyncio.run(store.get(output.uri)) == png

    [text] = asyncio.run(gen.run(op("text_generation", "gemini-2.5-flash")))
    assert isinstance(text, OperationCompleted)
    assert [o.text for o in text.outputs] == ["fake answer"]

    started, _ = asyncio.run(gen.run(op("video_generation", VEO, duration_seconds=4,
                                        output_gcs_uri="gs://fake-bucket")))
    assert isinstance(started, VideoStarted)
    [start] = fake.calls("predictLongRunning")
    assert start.body["parameters"]["storageUri"] == "gs://fake-bucket"
    done = [asyncio.run(gen.poll(started, n)) for n in (1, 2, 3)][2][0]
    assert isinstance(done, OperationCompleted) and done.success
    [video] = done.outputs
    assert video.uri.startswith("gs://fake-bucket/") and video.uri.endswith(".mp4")
    assert (video.mime_type, video.size, video.sha256) == ("video/mp4", None, None)
    assert list(tmp_path.rglob("*.mp4")) == []  # referenced, not copied


def test_a_bucket_outside_the_setting_is_refused_before_any_call(fake: FakeGemini) -> None:
    gen = Generation({"gemini": provider(fake)}, ProviderGuard(), PollSchedule())
    [done] = asyncio.run(gen.run(op("video_generation", VEO,
                                    output_gcs_uri="gs://someone-else/videos/")))
    assert isinstance(done, OperationCompleted) and not done.success
    assert "AIPIPE_VIDEO_OUTPUT_BUCKETS" in (done.error_message or "")
    assert fake.calls("predictLongRunning") == []


def test_an_output_gcs_uri_longer_than_a_job_keeps_is_refused_before_any_call(
    fake: FakeGemini
) -> None:
    long = "gs://fake-bucket/" + "v" * 1000
    with pytest.raises(ProviderError, match="output_gcs_uri has 1017 characters") as raised:
        asyncio.run(provider(fake).start_video(op("video_generation", VEO,
                                                  output_gcs_uri=long)))
    assert (raised.value.status, raised.value.retryable) == (400, False)
    assert fake.calls("predictLongRunning") == []


def test_a_server_that_hangs_up_gets_one_request_per_attempt() -> None:
    """The SDK's own retry of a hang-up is off: the guard's attempts (behind the breaker) are
    the only ones, so one attempt is one call that a provider may bill."""
    requests = []

    async def hang_up(head: bytes, writer: asyncio.StreamWriter) -> None:
        requests.append(head)  # and no answer at all

    def call(base: str) -> Awaitable[Any]:
        gemini = GeminiProvider(api_key=SecretStr("k"), base_url=base, timeout_seconds=30)
        return gemini.generate_image(op("image_generation", "gemini-2.5-flash-image"))

    error, _ = run_against(hang_up, call, (ProviderError,))
    assert isinstance(error, ProviderError), "a hang-up was taken for an answer"
    assert error.retryable and len(requests) == 1
