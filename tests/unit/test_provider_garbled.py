"""Answers a provider (or whatever answers at its base URL) should not give: a 2xx that is
not the API's is a failed attempt the breaker counts, and no more is billed than was asked."""

import base64
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted
from aipipe.streams.generation.gemini import GeminiProvider
from aipipe.streams.generation.openai_provider import OpenAIProvider
from aipipe.streams.generation.provider import ProviderError, VideoJob
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
