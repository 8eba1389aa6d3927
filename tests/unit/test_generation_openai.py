"""The real ``openai`` SDK against the local fake of the OpenAI endpoints.

Loopback only: the fake listens on 127.0.0.1 in this process; nothing leaves the machine.
"""

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, OperationCompleted, encode
from aipipe.schemas.prices import price_table_at
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.openai_provider import OpenAIProvider
from aipipe.streams.generation.outputs import StoringProvider
from aipipe.streams.generation.provider import ProviderError
from tests.support.fake_openai import ANSWER, IMAGE_TOKENS, FakeOpenAI, image_bytes, prompt_tokens

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
PROMPT = "a lighthouse at dawn, watercolour"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(text_tokens=42) as server:
        yield server


def provider(fake: FakeOpenAI) -> OpenAIProvider:
    return OpenAIProvider(api_key=SecretStr("sk-test-123"), base_url=fake.base_url,
                          timeout_seconds=5)


def op(operation_type: str, model: str, **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=NOW,
        operation_type=operation_type, provider="openai",  # type: ignore[arg-type]
        model=model, params={"prompt": PROMPT, **params},
    )


def generation(fake: FakeOpenAI, store: LocalArtifactStore, attempts: int = 1) -> Generation:
    stored = StoringProvider(provider(fake), store)
    return Generation({"openai": stored}, ProviderGuard(retry=RetryPolicy(attempts, 0, 0)),
                      PollSchedule())


def test_gpt_image_1_is_priced_by_its_tokens_and_its_png_is_stored(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path)
    [done] = asyncio.run(generation(fake, store).run(op("image_generation", "gpt-image-1",
                                                        quality="medium")))
    assert isinstance(done, OperationCompleted) and done.success, done.error_message
    tokens_in = prompt_tokens(PROMPT)
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.image_count) == (
        tokens_in, IMAGE_TOKENS, 1)
    assert done.cost_usd == (tokens_in * Decimal(5) + IMAGE_TOKENS * Decimal(40)) / 1_000_000
    assert done.price_version == price_table_at(NOW).version == "2026-12-01"
    png = image_bytes(PROMPT, 0)
    [output] = done.outputs
    assert (output.mime_type, output.size, output.sha256) == (
        "image/png", len(png), hashlib.sha256(png).hexdigest())
    assert asyncio.run(store.get(output.uri)) == png
    [call] = fake.calls("images")
    assert call.headers["authorization"] == "Bearer sk-test-123"
    assert call.body == {"model": "gpt-image-1", "prompt": PROMPT, "n": 1,
                         "size": "1024x1024", "quality": "medium"}


def test_dall_e_3_is_priced_per_image_by_quality_and_size(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    gen = generation(fake, LocalArtifactStore(tmp_path))
    [done] = asyncio.run(gen.run(op("image_generation", "dall-e-3", quality="hd",
                                    size="1792x1024")))
    assert isinstance(done, OperationCompleted) and done.success
    assert (done.usage.image_count, done.usage.image_variant) == (1, "hd 1792x1024")
    assert done.cost_usd == Decimal("0.12")
    [call] = fake.calls("images")
    assert call.body["response_format"] == "b64_json"
    assert (call.body["quality"], call.body["size"]) == ("hd", "1792x1024")


def test_dall_e_3_with_a_size_it_does_not_make_fails_without_a_call(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    gen = generation(fake, LocalArtifactStore(tmp_path))
    [done] = asyncio.run(gen.run(op("image_generation", "dall-e-3", size="1536x1024")))
    assert isinstance(done, OperationCompleted) and not done.success
    assert done.cost_usd == 0 and done.metadata["status"] == 400
    assert fake.calls("images") == []


def test_text_is_a_chat_completion_stored_and_inline(fake: FakeOpenAI, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    [done] = asyncio.run(generation(fake, store).run(
        op("text_generation", "gpt-4.1-mini", max_output_tokens=100)))
    assert isinstance(done, OperationCompleted) and done.success
    tokens_in = prompt_tokens(PROMPT)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (tokens_in, 42)
    assert done.cost_usd == (tokens_in * Decimal("0.40") + 42 * Decimal("1.60")) / 1_000_000
    [output] = done.outputs
    assert (output.mime_type, output.text) == ("text/plain", ANSWER)
    assert asyncio.run(store.get(output.uri)) == ANSWER.encode()
    [call] = fake.calls("chat")
    assert call.body == {"model": "gpt-4.1-mini", "max_completion_tokens": 100,
                         "messages": [{"role": "user", "content": PROMPT}]}
    assert b'"text":"A lighthouse' in encode(done)


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (403, False), (404, False),
    (429, True), (500, True), (503, True),
])
def test_statuses_map_to_retryable_or_not(fake: FakeOpenAI, status: int, retryable: bool) -> None:
    fake.fail_next("chat", status)
    with pytest.raises(ProviderError) as caught:
        asyncio.run(provider(fake).generate_text(op("text_generation", "gpt-4.1-mini")))
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert "sk-test-123" not in str(caught.value)
    assert len(fake.calls("chat")) == 1  # the SDK's own retries are off


def test_a_timeout_is_retryable() -> None:
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host, port = silent.getsockname()
        slow = OpenAIProvider(api_key=SecretStr("k"), base_url=f"http://{host}:{port}/v1",
                              timeout_seconds=0.3)
        with pytest.raises(ProviderError) as caught:
            asyncio.run(slow.generate_text(op("text_generation", "gpt-4.1-mini")))
    assert caught.value.retryable and caught.value.status is None


def test_a_retryable_failure_is_retried_and_the_operation_completes(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.fail_next("images", 503, 429)
    gen = generation(fake, LocalArtifactStore(tmp_path), attempts=3)
    [done] = asyncio.run(gen.run(op("image_generation", "gpt-image-1")))
    assert isinstance(done, OperationCompleted) and done.success
    assert [c.status for c in fake.calls("images")] == [503, 429, 200]


def test_without_a_key_the_operation_fails_with_the_setting_named() -> None:
    bare = OpenAIProvider(api_key=None)
    with pytest.raises(ProviderError, match="AIPIPE_OPENAI_API_KEY") as caught:
        asyncio.run(bare.generate_text(op("text_generation", "gpt-4.1-mini")))
    assert not caught.value.retryable
    assert "sk-secret" not in repr(OpenAIProvider(api_key=SecretStr("sk-secret")))


def test_a_dall_e_3_variant_the_table_lacks_is_refused_in_one_sentence() -> None:
    from aipipe.schemas.errors import PricingError
    from aipipe.schemas.events import Usage

    table = price_table_at(NOW)
    assert table.cost("dall-e-3", Usage(image_count=2, image_variant="standard 1024x1024")) \
        == Decimal("0.08")
    with pytest.raises(PricingError, match="'hd 512x512'; record one of: hd 1024x1024"):
        table.cost("dall-e-3", Usage(image_count=1, image_variant="hd 512x512"))
