"""Each provider end to end through the pipeline against its local fake: OpenAI (openai
SDK), Stability (httpx) and Gemini (google-genai), and a fallback while a model is down.

A real ``aipipe run streams`` worker on the local Kafka; requests go in as
``operation.requested`` through ``ResultClient.submit``; the outputs' bytes at their URIs
are what the fakes returned, and each cost is the price table's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess
from aipipe.producers.results import ResultClient
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationCompleted, OperationRequested, Usage
from aipipe.schemas.prices import price_table_at
from aipipe.streams.artifacts.store import LocalArtifactStore
from tests.support import fake_openai, fake_stability
from tests.support.fake_gemini import PNG as GEMINI_PNG
from tests.support.fake_gemini import FakeGemini
from tests.support.fake_gemini import prompt_tokens as gemini_tokens
from tests.support.fake_openai import FakeOpenAI
from tests.support.fake_stability import FakeStability

pytestmark = pytest.mark.e2e
PROMPT = "a lighthouse at dawn, watercolour"
LIMITS = '[models."dall-e-3"]\nfallbacks = ["stability/stable-image-core"]\n'


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeStability, FakeGemini]]:
    with FakeOpenAI() as openai, FakeStability() as stability, FakeGemini() as gemini:
        yield openai, stability, gemini


def completions(results: ResultClient, *requests: OperationRequested
                ) -> list[OperationCompleted]:
    """Submit ``requests`` together and wait for each completion."""
    async def all_of() -> list[Any]:
        return await asyncio.gather(*(results.submit(r, timeout=120) for r in requests))
    outcomes = asyncio.run(all_of())
    assert all(isinstance(o, OperationCompleted) for o in outcomes), outcomes
    return outcomes


def dalle_image(client: str, prompt: str = PROMPT) -> OperationRequested:
    return OperationRequested(request_id=f"req-{uuid.uuid4()}", client_id=client,
                              provider="openai", operation_type="image_generation",
                              model="dall-e-3", params={"prompt": prompt})


def poisoned_calls(openai: FakeOpenAI) -> int:
    """The image calls the fake received with a prompt it was told to fail on."""
    return len([c for c in openai.calls("images") if "POISON" in str(c.body.get("prompt"))])


def request(provider: str, model: str, kind: str = "image_generation",
            **params: Any) -> OperationRequested:
    return OperationRequested(
        request_id=f"req-{uuid.uuid4()}", client_id=f"client-{provider}", provider=provider,
        operation_type=kind, model=model,  # type: ignore[arg-type]
        params={"prompt": PROMPT, **params},
    )


def test_each_provider_end_to_end_and_a_fallback_while_a_model_is_down(
    settings: Settings, fakes: tuple[FakeOpenAI, FakeStability, FakeGemini], tmp_path: Path
) -> None:
    openai, stability, gemini = fakes
    limits = tmp_path / "limits.toml"
    limits.write_text(LIMITS)
    settings = settings.model_copy(update={
        "providers": "gemini,openai,stability",
        "openai_api_key": SecretStr("sk-openai-test"), "openai_base_url": openai.base_url,
        "stability_api_key": SecretStr("sk-stability-test"),
        "stability_base_url": stability.base_url,
        "gemini_api_key": SecretStr("gemini-test"), "gemini_base_url": gemini.base_url,
        "rate_limits_file": limits, "breaker_failure_threshold": 2,
        "provider_retry_attempts": 2, "provider_retry_base_seconds": 0.02,
        "provider_retry_cap_seconds": 0.05,
    })
    prepare_topics(settings)
    worker = WorkerProcess(settings, "streams").start()
    store = LocalArtifactStore(settings.home / "artifacts")
    try:
        with ResultClient(settings.kafka_bootstrap, settings.topics) as results:
            submit = partial(completions, results)

            gpt_image, dalle, text, sd35, flash = submit(
                request("openai", "gpt-image-1", quality="low"),
                request("openai", "dall-e-3", quality="hd", size="1024x1792"),
                request("openai", "gpt-4.1-mini", "text_generation", max_output_tokens=64),
                request("stability", "sd3.5-large", aspect_ratio="3:2"),
                request("gemini", "gemini-2.5-flash-image"),
            )
            openai.take_down("images", 503)
            fallen = submit(*(request("openai", "dall-e-3") for _ in range(3)))
    finally:
        worker.stop()

    table = price_table_at(gpt_image.requested_at)

    def check(done: OperationCompleted, usage: Usage, cost: Decimal, *data: bytes) -> None:
        assert done.success, done.error_message
        assert done.usage == usage
        assert done.cost_usd == cost == table.cost(done.model, usage)
        assert [o.sha256 for o in done.outputs] == [hashlib.sha256(d).hexdigest() for d in data]
        assert [asyncio.run(store.get(o.uri)) for o in done.outputs] == list(data)

    tokens = fake_openai.prompt_tokens(PROMPT)
    check(gpt_image, Usage(input_tokens=tokens, output_tokens=fake_openai.IMAGE_TOKENS,
                           image_count=1),
          (tokens * Decimal(5) + fake_openai.IMAGE_TOKENS * Decimal(40)) / 1_000_000,
          fake_openai.image_bytes(PROMPT, 0))
    check(dalle, Usage(image_count=1, image_variant="hd 1024x1792"), Decimal("0.12"),
          fake_openai.image_bytes(PROMPT, 0))
    check(text, Usage(input_tokens=tokens, output_tokens=openai.text_tokens),
          (tokens * Decimal("0.40") + openai.text_tokens * Decimal("1.60")) / 1_000_000,
          fake_openai.ANSWER.encode())
    assert text.outputs[0].text == fake_openai.ANSWER
    check(sd35, Usage(image_count=1), Decimal("0.065"), fake_stability.image_bytes(PROMPT))
    check(flash, Usage(input_tokens=gemini_tokens(PROMPT), output_tokens=1290, image_count=1),
          (gemini_tokens(PROMPT) * Decimal("0.30") + 1290 * Decimal(30)) / 1_000_000,
          base64.b64decode(GEMINI_PNG))

    for done in fallen:
        check(done, Usage(image_count=1), Decimal("0.03"), fake_stability.image_bytes(PROMPT))
        assert (done.provider, done.model) == ("stability", "stable-image-core")
        assert done.metadata["fallback"]["requested"] == "openai/dall-e-3"
        assert done.metadata["fallback"]["reason"] == "circuit_open"
    log = worker.log_path.read_text()
    assert "sk-openai-test" not in log and "sk-stability-test" not in log


def test_one_clients_failing_requests_do_not_open_the_circuit_for_the_others(
    settings: Settings,
) -> None:
    """A client whose prompts the provider answers with 503 gets its failures (after the
    retries); the other clients' requests to the same model go on being served, and an
    outage that fails them too still opens the circuit."""
    with FakeOpenAI() as openai:
        openai.poison("POISON", 503)
        settings = settings.model_copy(update={
            "providers": "openai", "openai_api_key": SecretStr("sk-openai-test"),
            "openai_base_url": openai.base_url, "breaker_failure_threshold": 3,
            "provider_retry_attempts": 2, "provider_retry_base_seconds": 0.02,
            "provider_retry_cap_seconds": 0.05,
        })
        prepare_topics(settings)
        worker = WorkerProcess(settings, "streams").start()
        try:
            with ResultClient(settings.kafka_bootstrap, settings.topics) as results:
                submit = partial(completions, results)

                # one at a time, so the order is the test's: the hostile client's first
                # request fails (2 attempts, under the threshold of 3), the steady client is
                # served after it, then the hostile client's next two fail as well
                hostile = submit(dalle_image("hostile", "POISON 0"))
                first = submit(dalle_image("steady"))
                hostile += [submit(dalle_image("hostile", f"POISON {i}"))[0] for i in (1, 2)]
                steady = submit(*(dalle_image("steady") for _ in range(5)))
                poisoned = poisoned_calls(openai)
                openai.take_down("images", 503)
                down = [submit(dalle_image("steady"))[0] for _ in range(3)]
        finally:
            worker.stop()

    assert first[0].success and all(done.success for done in steady), steady
    for done in hostile:  # failed on the provider's answers, each attempt made
        assert not done.success and done.error_message != "provider_unavailable"
    assert poisoned == 3 * 2  # 6 failures past a threshold of 3, and no circuit
    assert down[-1].error_message == "provider_unavailable"  # an outage still opens it


def test_a_client_whose_trial_failed_does_not_take_the_next_trial(settings: Settings) -> None:
    """After an outage the circuit is open; a client whose requests the provider still
    fails keeps sending them. Its first one after the cool-down is the trial and reopens the
    circuit; it may not take the next trial before a second cool-down, so a steady client's
    request after one cool-down is the trial, succeeds and closes the circuit."""
    cooldown = 2.0

    with FakeOpenAI() as openai:
        settings = settings.model_copy(update={
            "providers": "openai", "openai_api_key": SecretStr("sk-openai-test"),
            "openai_base_url": openai.base_url, "breaker_failure_threshold": 3,
            "breaker_cooldown_seconds": cooldown, "provider_retry_attempts": 1,
        })
        prepare_topics(settings)
        worker = WorkerProcess(settings, "streams").start()
        try:
            with ResultClient(settings.kafka_bootstrap, settings.topics) as results:
                submit = partial(completions, results)
                openai.take_down("images", 503)  # an outage opens the circuit
                outage = [submit(dalle_image("steady"))[0] for _ in range(3)]
                openai.recover("images")
                openai.poison("POISON", 503)
                # the hostile client's requests are refused while the circuit is open; its
                # first after the cool-down is the trial, and fails
                deadline = time.monotonic() + 60
                while poisoned_calls(openai) == 0:
                    assert time.monotonic() < deadline, "no trial reached the provider"
                    submit(dalle_image("hostile", "POISON"))
                reopened = time.monotonic()
                # it keeps sending, past the next cool-down
                hammered = []
                while time.monotonic() - reopened < 1.5 * cooldown:
                    hammered += submit(dalle_image("hostile", "POISON"))
                steady = submit(dalle_image("steady"))[0]
                trials_taken = poisoned_calls(openai)
        finally:
            worker.stop()

    assert outage[-1].error_message != "provider_unavailable"  # the third failure opened it
    assert all(not done.success for done in hammered)
    assert {done.error_message for done in hammered} == {"provider_unavailable"}
    assert trials_taken == 1  # the hostile client took the first trial only
    assert steady.success, steady  # the steady client's trial closed the circuit
