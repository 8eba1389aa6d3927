"""Fallbacks: while a model's circuit is open, operations run on the first fallback whose
circuit is closed, priced at that model, and the completion says so.

The real SDKs against the local fakes: OpenAI answers 503s, Stability answers images.
"""

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from aipipe.infra.settings import Settings
from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    ProviderCircuitOpened,
    VideoPollScheduled,
    VideoStarted,
)
from aipipe.schemas.limits import LimitError, parse_limit
from aipipe.streams.admission.limits import limits_from_toml
from aipipe.streams.artifacts.store import LocalArtifactStore
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.breaker import BreakerPolicy
from aipipe.streams.generation.gemini import GeminiProvider
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.openai_provider import OpenAIProvider
from aipipe.streams.generation.registry import guard_from_settings
from aipipe.streams.generation.stability import StabilityProvider
from tests.support.fake_gemini import FakeGemini
from tests.support.fake_openai import FakeOpenAI
from tests.support.fake_stability import FakeStability

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
LIMITS = """
[models."gpt-image-1"]
fallbacks = ["stability/stable-image-ultra", "stability/stable-image-core"]
[models."gpt-4.1-mini"]
limit = "10/60s"
fallbacks = ["gpt-5-mini"]
"""


@pytest.fixture
def fakes() -> Iterator[tuple[FakeOpenAI, FakeStability]]:
    with FakeOpenAI() as openai_fake, FakeStability() as stability_fake:
        yield openai_fake, stability_fake


def op(n: int, model: str = "gpt-image-1", kind: str = "image_generation",
       **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id=f"r{n}", client_id="acme", operation_id=f"op-{n}", requested_at=NOW,
        operation_type=kind, provider="openai", model=model,  # type: ignore[arg-type]
        params={"prompt": f"a lighthouse, take {n}", **params},
    )


def generation(fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path,
               param_limits: Any = None) -> Generation:
    openai_fake, stability_fake = fakes
    limits = limits_from_toml(LIMITS, parse_limit("60/60s", "x"), "limits.toml")
    guard = ProviderGuard(
        breaker=BreakerPolicy(threshold=2, window=60, cooldown=300),
        retry=RetryPolicy(attempts=2, base=0, cap=0),
        fallbacks=limits.fallbacks_for,
    )
    providers = {
        "openai": OpenAIProvider(api_key=SecretStr("k"), base_url=openai_fake.base_url),
        "stability": StabilityProvider(api_key=SecretStr("k"), base_url=stability_fake.base_url),
    }
    return Generation(providers, guard, PollSchedule(), artifacts=LocalArtifactStore(tmp_path),
                      param_limits=param_limits)


def test_with_the_model_down_operations_complete_on_the_fallback_and_say_so(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    openai_fake, stability_fake = fakes
    openai_fake.take_down("images", 503)
    stability_fake.take_down("ultra", 503)  # the first fallback is down too
    gen = generation(fakes, tmp_path)

    async def three() -> list[list[Any]]:
        return [await gen.run(op(n)) for n in (1, 2, 3)]

    runs = asyncio.run(three())
    completions = [e for events in runs for e in events if isinstance(e, OperationCompleted)]
    assert [(c.operation_id, c.success, c.provider, c.model) for c in completions] == [
        (f"op-{n}", True, "stability", "stable-image-core") for n in (1, 2, 3)]
    assert all(c.cost_usd == Decimal("0.03") and len(c.outputs) == 1 for c in completions)
    first, later = completions[0].metadata["fallback"], completions[1].metadata["fallback"]
    assert first["requested"] == "openai/gpt-image-1"
    assert first["ran"] == "stability/stable-image-core" and first["reason"] == "circuit_open"
    assert first["tried"] == [
        "openai/gpt-image-1: openai images.generate: 503 fake_503",
        "stability/stable-image-ultra: stability ultra: 503 service_unavailable"]
    assert later["tried"] == [
        "openai/gpt-image-1: provider_unavailable",
        "stability/stable-image-ultra: fallback stability/stable-image-ultra: its circuit is "
        "not closed either"]
    opened = [(e.provider, e.model) for events in runs for e in events
              if isinstance(e, ProviderCircuitOpened)]
    assert opened == [("openai", "gpt-image-1"), ("stability", "stable-image-ultra")]
    # the open circuits are not called again: two attempts each, in the first operation
    assert len(openai_fake.calls("images")) == 2 and len(stability_fake.calls("ultra")) == 2
    assert len(stability_fake.calls("core")) == 3


def test_a_fallback_that_cannot_take_the_params_is_passed_over(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    openai_fake, stability_fake = fakes
    openai_fake.take_down("images", 503)
    [*_, done] = asyncio.run(generation(fakes, tmp_path).run(op(1, quality="high")))
    assert isinstance(done, OperationCompleted) and not done.success
    assert (done.provider, done.model, done.cost_usd) == ("stability", "stable-image-core", 0)
    assert "params.quality' is not taken by stability" in (done.error_message or "")
    assert stability_fake.requests == []


def test_a_fallback_is_held_to_the_operators_limits_not_the_defaults(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    """With AIPIPE_PROMPT_MAX_CHARS raised, admission takes a longer prompt, and so does
    the fallback (it was held to the default 8,000 characters and refused every one)."""
    from aipipe.streams.admission.params import ParamLimits

    openai_fake, stability_fake = fakes
    openai_fake.take_down("images", 503)
    long = op(1)
    long = long.model_copy(update={"params": {**long.params, "prompt": "a lighthouse " * 800}})
    raised = generation(fakes, tmp_path, ParamLimits(prompt_max_chars=20_000))
    [*_, done] = asyncio.run(raised.run(long))
    assert isinstance(done, OperationCompleted) and done.success
    assert (done.provider, done.model) == ("stability", "stable-image-ultra")
    [*_, refused] = asyncio.run(generation(fakes, tmp_path / "d").run(long))
    assert isinstance(refused, OperationCompleted) and not refused.success
    assert "must be a string of 1 to 8000 characters" in (refused.error_message or "")
    assert len(stability_fake.requests) == 1


def test_a_permanent_error_does_not_fall_back(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    openai_fake, stability_fake = fakes
    openai_fake.fail_next("images", 400)
    [done] = asyncio.run(generation(fakes, tmp_path).run(op(1)))
    assert isinstance(done, OperationCompleted) and not done.success
    assert (done.provider, done.model) == ("openai", "gpt-image-1")
    assert "fallback" not in done.metadata and stability_fake.requests == []


def test_a_bare_fallback_model_is_of_the_same_provider(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    openai_fake, _ = fakes
    openai_fake.fail_next("chat", 503, 503)
    [*_, done] = asyncio.run(generation(fakes, tmp_path).run(
        op(1, "gpt-4.1-mini", "text_generation")))
    assert isinstance(done, OperationCompleted) and done.success
    assert (done.provider, done.model) == ("openai", "gpt-5-mini")
    assert [c.body["model"] for c in openai_fake.calls("chat")] == [
        "gpt-4.1-mini", "gpt-4.1-mini", "gpt-5-mini"]


def test_the_limits_file_parses_fallbacks_and_refuses_bad_ones() -> None:
    limits = limits_from_toml(LIMITS, parse_limit("60/60s", "x"), "f.toml")
    assert set(limits.models) == {"gpt-4.1-mini"}  # a fallbacks-only entry has no limit
    assert limits.fallbacks_for("openai", "gpt-image-1") == (
        ("stability", "stable-image-ultra"), ("stability", "stable-image-core"))
    assert limits.fallbacks_for("openai", "gpt-4.1-mini") == (("openai", "gpt-5-mini"),)
    assert limits.fallbacks_for("openai", "dall-e-3") == ()
    for bad in ('fallbacks = "dall-e-3"', "fallbacks = [1]", 'fallbacks = ["a/b/c"]',
                'fallbacks = ["m"]'):
        with pytest.raises(LimitError, match=r'Entry \[models\."m"\]\.fallbacks of f\.toml'):
            limits_from_toml(f'[models."m"]\nlimit = "1/1s"\n{bad}', parse_limit("1/1s", "x"),
                             "f.toml")


def test_the_guard_from_settings_reads_fallbacks_from_the_limits_file(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(LIMITS)
    guard = guard_from_settings(Settings(rate_limits_file=path))
    assert guard.fallbacks("openai", "gpt-4.1-mini") == (("openai", "gpt-5-mini"),)
    assert guard_from_settings(Settings()).fallbacks("openai", "gpt-4.1-mini") == ()


def test_a_video_starts_on_the_fallback_while_its_model_is_down_and_completes_saying_so(
    tmp_path: Path,
) -> None:
    veo, fast = "veo-3.0-generate-001", "veo-3.0-fast-generate-001"
    limits = limits_from_toml(f'[models."{veo}"]\nfallbacks = ["{fast}"]\n',
                              parse_limit("60/60s", "x"), "limits.toml")
    guard = ProviderGuard(breaker=BreakerPolicy(threshold=2, window=60, cooldown=300),
                          retry=RetryPolicy(attempts=2, base=0, cap=0),
                          fallbacks=limits.fallbacks_for)
    with FakeGemini(video_polls=1) as fake:
        fake.take_down("predictLongRunning", 503, model=veo)
        gemini = GeminiProvider(base_url=fake.base_url, vertex_project="p",
                                vertex_access_token=SecretStr("t"),
                                video_output_buckets=("fake-bucket",))
        gen = Generation({"gemini": gemini}, guard, PollSchedule(),
                         artifacts=LocalArtifactStore(tmp_path))
        # (the fake writes its videos at the top of fake-bucket)
        video = op(1, veo, "video_generation", duration_seconds=6,
                   output_gcs_uri="gs://fake-bucket/").model_copy(
            update={"provider": "gemini"})
        events = asyncio.run(gen.run(video))
        [started] = [e for e in events if isinstance(e, VideoStarted)]
        assert isinstance(events[-1], VideoPollScheduled)
        assert (started.provider, started.model) == ("gemini", fast)
        assert started.fallback == {
            "requested": f"gemini/{veo}", "ran": f"gemini/{fast}", "reason": "circuit_open",
            "tried": [f"gemini/{veo}: gemini generate_videos: 503 UNAVAILABLE"]}
        # a restarted worker polls from the event alone: the completion is the fallback's
        again = Generation({"gemini": gemini}, guard, PollSchedule(),
                           artifacts=LocalArtifactStore(tmp_path))
        [done, *_] = asyncio.run(again.poll(started, 1))
        assert isinstance(done, OperationCompleted) and done.success
        assert (done.provider, done.model) == ("gemini", fast)
        assert done.cost_usd == Decimal("0.90")  # 6 s at the fallback's $0.15/s
        assert done.metadata["fallback"] == started.fallback
        assert [c.path.rsplit("/models/", 1)[-1] for c in fake.calls("predictLongRunning")] == [
            f"{veo}:predictLongRunning", f"{veo}:predictLongRunning",
            f"{fast}:predictLongRunning"]


def test_fallbacks_are_looked_up_only_for_a_model_that_is_down() -> None:
    """The call has run (and is billed) before the lookup: a lookup that raised (a limits
    file being rewritten) turned a successful image into an uncosted internal error."""
    from aipipe.streams.generation.simulated import SimulatedProvider

    def broken(provider: str, model: str) -> Any:
        raise RecursionError("a limits file nested too deep")

    gen = Generation({"simulated": SimulatedProvider()}, ProviderGuard(fallbacks=broken),
                     PollSchedule())
    image = op(1).model_copy(update={"provider": "simulated",
                                     "model": "gemini-2.5-flash-image"})
    [done] = asyncio.run(gen.run(image))
    assert isinstance(done, OperationCompleted) and done.success and done.cost_usd > 0


def test_a_fallback_runs_within_its_own_models_rate_limit(
    fakes: tuple[FakeOpenAI, FakeStability], tmp_path: Path
) -> None:
    """Admission counted the requests against the model they asked for; while its circuit
    is open they would all land on the fallback, past that provider's quota."""
    from aipipe.streams.admission.gate import AdmissionGate
    from aipipe.streams.admission.limiter import FailoverLimiter, MemoryRateLimitStore
    from aipipe.streams.admission.limits import LimitsSource

    openai_fake, stability_fake = fakes
    openai_fake.take_down("images", 503)
    stability_fake.take_down("ultra", 503)
    path = tmp_path / "limits.toml"
    path.write_text(LIMITS + '[models."stable-image-core"]\nlimit = "2/60s"\n')
    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()),
                         LimitsSource(parse_limit("60/60s", "x"), path), None, "t")
    gen = generation(fakes, tmp_path)
    gen.fallback_slot = gate.fallback_slot

    async def five() -> list[list[Any]]:
        return [await gen.run(op(n)) for n in range(1, 6)]

    completions = [e for events in asyncio.run(five()) for e in events
                   if isinstance(e, OperationCompleted)]
    assert [c.success for c in completions] == [True, True, False, False, False]
    assert "fallback stability/stable-image-core: its rate limit is reached" in (
        completions[2].error_message or "")
    assert len(stability_fake.calls("core")) == 2
    again = asyncio.run(gen.run(op(1)))  # a re-run of an operation that had its slot
    assert [c.success for c in again if isinstance(c, OperationCompleted)] == [True]
