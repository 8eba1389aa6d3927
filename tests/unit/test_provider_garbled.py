"""Answers a provider (or whatever answers at its base URL) should not give: a 2xx that is
not the API's is a failed attempt the breaker counts, no more is kept or billed than was
asked, and a video is believed only where the request asked for it."""

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from annotated_types import MaxLen
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, OperationCompleted
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.gemini import MAX_IMAGES, GeminiProvider
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.openai_provider import OpenAIProvider
from aipipe.streams.generation.outputs import StoringProvider
from aipipe.streams.generation.provider import ProviderError, VideoJob, VideoStatus
from aipipe.streams.generation.stability import StabilityProvider
from tests.support.fake_openai import image_bytes
from tests.support.raw_http import canned, run_against

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def op(provider: str, model: str, **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=NOW,
        operation_type="image_generation", provider=provider, model=model,  # type: ignore[arg-type]
        params={"prompt": "a lighthouse", **params})


def answering(body: bytes, content_type: str,
              call: Callable[[str], Awaitable[Any]]) -> Any:
    """``call(base_url)`` against a local server that answers every request 200 ``body``;
    its result, or the ProviderError it raised."""
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode()
              + b"\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\nConnection: close\r\n\r\n" + body)
    return run_against(canned(answer, hold=0), call, (ProviderError,))[0]


def answer(status: int, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def openai(base: str) -> OpenAIProvider:
    return OpenAIProvider(api_key=SecretStr("sk-test"), base_url=base + "/v1",
                          timeout_seconds=10)


@pytest.mark.parametrize(("body", "content_type"), [
    (b"<html><body>Welcome to nginx!</body></html>", "text/html"),
    (b'{"data": "not a list", "usage": {"input_tokens": -5}}', "application/json"),
    (b'{"data": [{"b64_json": "%%%not base64%%%"}]}', "application/json"),
], ids=["html-page", "wrong-shapes", "bad-base64"])
def test_an_openai_answer_that_is_not_the_apis_is_a_retryable_failure(
    body: bytes, content_type: str
) -> None:
    error = answering(body, content_type,
                      lambda base: openai(base).generate_image(op("openai", "gpt-image-1")))
    assert isinstance(error, ProviderError) and error.retryable, error
    assert "an answer that is not the API's" in str(error)


def test_more_openai_images_than_asked_for_are_neither_kept_nor_billed() -> None:
    images = [{"b64_json": base64.b64encode(image_bytes("p", i)).decode()} for i in range(10)]
    body = json.dumps({"created": 1, "data": images}).encode()
    result = answering(body, "application/json",
                       lambda base: openai(base).generate_image(op("openai", "dall-e-3")))
    assert result.success and result.usage.image_count == 1 and len(result.outputs) == 1


def test_a_veo_answer_of_empty_entries_is_no_video_and_no_seconds() -> None:
    body = json.dumps({"name": "operations/1", "done": True,
                       "response": {"videos": [{} for _ in range(50)]}}).encode()

    async def poll(base: str) -> Any:
        gemini = GeminiProvider(api_key=SecretStr("k"), base_url=base, vertex_project="p",
                                vertex_access_token=SecretStr("t"), timeout_seconds=10)
        return await gemini.poll_video("veo-3.0-fast-generate-001",
                                       VideoJob("operations/1", {"duration_seconds": 8}), 1)

    status = answering(body, "application/json", poll)
    assert status.done and status.error_message is not None and not status.outputs
    assert not status.usage.video_seconds


def test_a_gemini_answer_that_is_not_the_apis_is_a_retryable_failure() -> None:
    async def image(base: str) -> Any:
        gemini = GeminiProvider(api_key=SecretStr("k"), base_url=base, timeout_seconds=10)
        return await gemini.generate_image(op("gemini", "gemini-2.5-flash-image"))

    error = answering(b"<html><body>Welcome to nginx!</body></html>", "text/html", image)
    assert isinstance(error, ProviderError) and error.retryable, error
    assert "an answer that is not the API's" in str(error)


OPENAI_CALLS = {
    "images": lambda base: openai(base).generate_image(op("openai", "gpt-image-1")),
    "chat": lambda base: openai(base).generate_text(
        op("openai", "gpt-4.1-mini").model_copy(update={"operation_type": "text_generation"})),
}


@pytest.mark.parametrize("call", OPENAI_CALLS)
@pytest.mark.parametrize("body", [b'{"data": [', b'{"choices": [', b"\xff\xfe{"],
                         ids=["cut-data", "cut-choices", "not-utf8"])
def test_an_openai_json_body_that_does_not_parse_is_a_retryable_failure(
    call: str, body: bytes
) -> None:
    """The SDK's JSONDecodeError escaped the provider: the operation ended an internal error
    at $0 that the breaker never counted."""
    error = answering(body, "application/json", OPENAI_CALLS[call])
    assert isinstance(error, ProviderError) and error.retryable, error
    assert "an answer that is not the API's" in str(error)


def test_an_openai_body_that_does_not_parse_counts_against_the_circuit() -> None:
    body = b'{"data": ['

    async def nap(seconds: float) -> None:
        pass

    async def go(base: str) -> tuple[OperationCompleted, int]:
        guard = ProviderGuard(retry=RetryPolicy(attempts=3), sleep=nap)
        gen = Generation({"openai": openai(base)}, guard, PollSchedule())
        [done] = await gen.run(op("openai", "gpt-image-1"))
        assert isinstance(done, OperationCompleted)
        return done, len(guard.state("openai", "gpt-image-1").failures)

    (done, failures), _ = run_against(canned(answer(200, "application/json", body), hold=0), go)
    assert not done.success and done.cost_usd == 0
    assert done.metadata["reason"] == "retries_exhausted" and failures == 3


@pytest.mark.parametrize(("status", "content_type", "body", "retryable"), [
    (200, "application/json", b'{"data": [', True),
    (200, "image/png; charset=utf-8", b"", True),
    (500, "application/json", b'{"name": [', True),
    (500, "application/json", b"\xff\xfe", True),
    (400, "application/json", b"[" * 5000, False),
], ids=["200-cut-json", "200-empty-image", "500-cut-json", "500-not-utf8", "400-deep"])
def test_a_stability_body_that_does_not_parse_is_a_provider_error(
    status: int, content_type: str, body: bytes, retryable: bool
) -> None:
    """Stability reads its answer as bytes and its errors with a guarded parse: no body
    escapes as an internal error (checked alongside OpenAI's hole, which it did not share)."""
    def call(base: str) -> Awaitable[Any]:
        stability = StabilityProvider(api_key=SecretStr("k"), base_url=base, timeout_seconds=10)
        return stability.generate_image(op("stability", "stable-image-core"))

    error = run_against(canned(answer(status, content_type, body), hold=0), call,
                        (ProviderError,))[0]
    assert isinstance(error, ProviderError) and error.retryable is retryable, error


def gemini(base: str, buckets: tuple[str, ...] = ("b",)) -> GeminiProvider:
    return GeminiProvider(api_key=SecretStr("k"), base_url=base, vertex_project="p",
                          vertex_access_token=SecretStr("t"), timeout_seconds=10,
                          video_output_buckets=buckets)


@pytest.mark.parametrize("usage", [
    {"promptTokenCount": -5, "candidatesTokenCount": 3},
    {"promptTokenCount": 2 ** 70, "candidatesTokenCount": 3},
    {"promptTokenCount": 5, "candidatesTokenCount": 2 ** 53, "thoughtsTokenCount": 2 ** 53},
    {"promptTokenCount": 5, "candidatesTokenCount": 3, "thoughtsTokenCount": -4},
], ids=["negative", "past-2^70", "sum-past-2^53", "negative-thoughts"])
def test_gemini_usage_no_count_can_hold_is_a_retryable_failure(usage: dict[str, int]) -> None:
    """The Usage's validation error escaped the provider (an internal error at $0, not
    counted by the breaker). Usage past any plausible amount that a count can hold is priced
    and flagged ``implausible`` at completion instead (test_usage_problems.py)."""
    body = json.dumps({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                       "usageMetadata": usage}).encode()
    error = answering(body, "application/json", lambda base: gemini(base).generate_text(
        op("gemini", "gemini-2.5-flash").model_copy(update={"operation_type": "text_generation"})))
    assert isinstance(error, ProviderError) and error.retryable, error
    assert str(error) == ("gemini generate_content: an answer that is not the API's "
                          "(ValidationError)")


def test_gemini_keeps_at_most_the_images_a_completion_carries(tmp_path: Path) -> None:
    """65 images in one answer made a completion past its 64 outputs: an internal error at
    $0, with all 65 stored. Gemini takes no image count, so what a completion carries is the
    bound; the tokens stay as the answer reports them."""
    [limit] = [m.max_length for m in OperationCompleted.model_fields["outputs"].metadata
               if isinstance(m, MaxLen)]
    assert limit == MAX_IMAGES  # what a completion carries
    parts = [{"inlineData": {"mimeType": "image/png",
                             "data": base64.b64encode(image_bytes("g", i)).decode()}}
             for i in range(MAX_IMAGES + 1)]
    body = json.dumps({"candidates": [{"content": {"parts": parts}}], "usageMetadata": {
        "promptTokenCount": 10, "candidatesTokenCount": 1290 * (MAX_IMAGES + 1)}}).encode()
    store = LocalArtifactStore(tmp_path)

    async def go(base: str) -> OperationCompleted:
        gen = Generation({"gemini": StoringProvider(gemini(base), store)}, ProviderGuard(),
                         PollSchedule())
        [done] = await gen.run(op("gemini", "gemini-2.5-flash-image"))
        assert isinstance(done, OperationCompleted)
        return done

    done, _ = run_against(canned(answer(200, "application/json", body), hold=0), go)
    assert done.success and len(done.outputs) == MAX_IMAGES == done.usage.image_count
    assert done.usage.output_tokens == 1290 * (MAX_IMAGES + 1)
    assert done.metadata["images_not_kept"] == 1
    assert sum(1 for p in tmp_path.rglob("*.png")) == MAX_IMAGES


REQUESTED = {"duration_seconds": 8, "output_gcs_uri": "gs://b/videos"}
NONE_REQUESTED = {"duration_seconds": 8, "output_gcs_uri": None}
BEFORE_THE_CHECK = {"duration_seconds": 8}  # a job started by an older worker


def poll(job: dict[str, Any], uri: str, buckets: tuple[str, ...] = ("b",)) -> VideoStatus:
    body = json.dumps({"name": "operations/1", "done": True, "response": {
        "videos": [{"gcsUri": uri, "mimeType": "video/mp4"}]}}).encode()
    status = answering(body, "application/json", lambda base: gemini(base, buckets).poll_video(
        "veo-3.0-fast-generate-001", VideoJob("operations/1", job), 1))
    assert isinstance(status, VideoStatus) and status.done
    return status


@pytest.mark.parametrize(("job", "uri"), [
    (REQUESTED, "gs://b/videos/123/sample_0.mp4"),
    (REQUESTED | {"output_gcs_uri": "gs://b/videos/"}, "gs://b/videos/sample_0.mp4"),
    (BEFORE_THE_CHECK, "gs://b/anywhere/sample_0.mp4"),
], ids=["under-the-folder", "folder-with-slash", "job-before-the-check"])
def test_a_veo_video_under_the_requested_folder_is_referenced(
    job: dict[str, Any], uri: str
) -> None:
    status = poll(job, uri)
    assert status.error_message is None and [o.uri for o in status.outputs] == [uri]
    assert status.usage.video_seconds == 8


OUTSIDE = ("not under the requested output_gcs_uri 'gs://b/videos' in a bucket of "
           "AIPIPE_VIDEO_OUTPUT_BUCKETS")
NOT_GS = "not a gs:// URI in a bucket of AIPIPE_VIDEO_OUTPUT_BUCKETS"


@pytest.mark.parametrize(("job", "uri", "buckets", "why"), [
    (REQUESTED, "file:///etc/passwd", ("b",), OUTSIDE),
    (REQUESTED, "https://example.com/v.mp4", ("b",), OUTSIDE),
    (REQUESTED, "gs://other/videos/v.mp4", ("b", "other"), OUTSIDE),
    (REQUESTED, "gs://b/videos-of-others/v.mp4", ("b",), OUTSIDE),
    (REQUESTED, "gs://b/videos/", ("b",), OUTSIDE),
    (REQUESTED, "gs://b/videos/../secrets/v.mp4", ("b",), OUTSIDE),
    (REQUESTED, "gs://b/videos/v.mp4\nforged", ("b",), OUTSIDE),
    (REQUESTED, "gs://b/videos/" + "v" * 2048, ("b",), OUTSIDE),
    (REQUESTED, "gs://b/videos/v.mp4", (), OUTSIDE),
    (NONE_REQUESTED, "gs://b/videos/v.mp4", ("b",),
     "but the request named no output_gcs_uri (Veo answers with bytes then)"),
    (BEFORE_THE_CHECK, "file:///etc/passwd", ("b",), NOT_GS),
    (BEFORE_THE_CHECK, "gs://other/v.mp4", ("b",), NOT_GS),
], ids=["file", "https", "other-bucket", "sibling-folder", "the-folder-itself", "dot-dot",
        "control-character", "past-2048", "bucket-no-longer-allowed", "none-requested",
        "old-job-file", "old-job-other-bucket"])
def test_a_veo_video_anywhere_else_is_a_failed_video_that_says_where(
    job: dict[str, Any], uri: str, buckets: tuple[str, ...], why: str
) -> None:
    """A poll's gcsUri was recorded as the video unchecked: file:///etc/passwd, another
    bucket, another folder, or any URI when the request named none."""
    status = poll(job, uri, buckets)
    assert status.outputs == () and not status.usage.video_seconds
    assert status.error_message is not None
    assert status.error_message.startswith("video not recorded: the provider answered it at ")
    assert status.error_message.endswith(why)


def test_a_video_at_a_uri_no_request_asked_for_completes_failed_at_no_cost() -> None:
    """The whole path: started without ``output_gcs_uri`` (Veo then answers with the bytes),
    polled, answered with a URI: one failed completion that says why, nothing recorded."""
    done_answer = json.dumps({"name": "operations/1", "done": True, "response": {
        "videos": [{"gcsUri": "file:///etc/passwd", "mimeType": "video/mp4"}]}}).encode()

    async def veo(head: bytes, writer: asyncio.StreamWriter) -> None:
        started = b":predictLongRunning" in head.split(b"\r\n", 1)[0]
        writer.write(answer(200, "application/json",
                            b'{"name": "operations/1"}' if started else done_answer))
        await writer.drain()

    async def go(base: str) -> list[Any]:
        gen = Generation({"gemini": gemini(base)}, ProviderGuard(), PollSchedule())
        started, _ = await gen.run(op("gemini", "veo-3.0-fast-generate-001").model_copy(
            update={"operation_type": "video_generation"}))
        assert started.job == {"duration_seconds": 8, "output_gcs_uri": None}
        return await gen.poll(started, 1)

    [done, *_], _ = run_against(veo, go)
    assert isinstance(done, OperationCompleted) and not done.success
    assert (done.outputs, done.cost_usd, done.metadata["reason"]) == ([], 0, "video_failed")
    assert done.error_message == (
        "video not recorded: the provider answered it at 'file:///etc/passwd', but the request "
        "named no output_gcs_uri (Veo answers with bytes then)")
