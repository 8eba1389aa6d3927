"""The simulated provider: scripted per request, defaults from settings, deterministic."""

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.schemas.events import OperationAdmitted
from aipipe.streams.generation import ProviderError, SimulatedProvider
from aipipe.streams.generation.outputs import StoringProvider
from aipipe.streams.generation.registry import providers_from_settings

NOW = datetime(2026, 11, 26, tzinfo=UTC)


def op(n: int, kind: str = "image_generation", **params: Any) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r", client_id="c", operation_id=f"op-{n}", requested_at=NOW,
        operation_type=kind, model="m", params={"prompt": "p", **params},  # type: ignore[arg-type]
    )


def test_a_failure_rate_fails_the_same_share_of_operations_on_every_run() -> None:
    provider = SimulatedProvider(failure_rate=0.25)
    outcomes = [asyncio.run(provider.generate_image(op(n))).success for n in range(400)]
    again = [asyncio.run(provider.generate_image(op(n))).success for n in range(400)]
    assert outcomes == again
    assert 70 <= outcomes.count(False) <= 130
    assert asyncio.run(provider.generate_image(op(1, simulate={"fail": False}))).success


def test_a_video_is_done_on_the_scripted_poll_and_can_fail_to_start() -> None:
    provider = SimulatedProvider(video_polls=2)
    job = asyncio.run(provider.start_video(op(1, "video_generation", simulate={"polls": 4})))
    done = [asyncio.run(provider.poll_video("m", job, n)).done for n in (1, 2, 3, 4)]
    assert done == [False, False, False, True]
    default = asyncio.run(provider.start_video(op(2, "video_generation")))
    assert asyncio.run(provider.poll_video("m", default, 2)).done
    with pytest.raises(ProviderError, match="simulated provider failure"):
        asyncio.run(provider.start_video(op(3, "video_generation", simulate={"fail": True})))


def test_settings_configure_the_providers() -> None:
    settings = Settings(simulated_failure_rate=0.5, simulated_video_polls=3,
                        simulated_latency_ms=7, simulated_enabled=True,
                        simulated_max_latency_ms=100, simulated_max_polls=9)
    stored = providers_from_settings(settings)["simulated"]
    assert isinstance(stored, StoringProvider)
    simulated = stored.inner
    assert isinstance(simulated, SimulatedProvider)
    assert (simulated.failure_rate, simulated.video_polls, simulated.latency_ms) == (0.5, 3, 7)
    assert (simulated.max_latency_ms, simulated.max_polls) == (100, 9)


def test_only_offered_providers_are_built() -> None:
    assert set(providers_from_settings(Settings(simulated_enabled=False))) == {"gemini"}
    assert set(providers_from_settings(Settings(simulated_enabled=True))) == {"gemini",
                                                                              "simulated"}
    assert set(providers_from_settings(Settings(simulated_enabled=True, providers=""))) == {
        "simulated"}
    assert providers_from_settings(Settings(simulated_enabled=False, providers="")) == {}


def test_a_requests_script_is_bounded_even_past_admission(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operation admitted before the bounds existed still cannot stall the worker."""
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    provider = SimulatedProvider(max_latency_ms=50, max_polls=2)
    asyncio.run(provider.generate_image(op(1, simulate={"latency_ms": 3_600_000})))
    job = asyncio.run(provider.start_video(op(2, "video_generation", simulate={"polls": 10_000})))
    assert job.metadata["polls"] == 2
    assert slept == [0.05]


def test_outputs_are_deterministic_pngs_and_text_stored_once_across_re_runs(
    tmp_path: Path,
) -> None:
    from aipipe.schemas.events import OperationCompleted
    from aipipe.streams.artifacts.store import LocalArtifactStore
    from aipipe.streams.generation import Generation
    from aipipe.streams.generation.backoff import PollSchedule
    from aipipe.streams.generation.guard import ProviderGuard

    store = LocalArtifactStore(tmp_path)
    stored = StoringProvider(SimulatedProvider(), store)
    gen = Generation({"simulated": stored}, ProviderGuard(), PollSchedule())
    image = op(1).model_copy(update={"model": "gemini-2.5-flash-image",
                                     "params": {"prompt": "p", "n": 2}})
    runs = [asyncio.run(gen.run(image)) for _ in range(2)]  # a re-run after a crash
    first, again = (next(e for e in r if isinstance(e, OperationCompleted)) for r in runs)
    assert first.outputs == again.outputs and len(first.outputs) == 2
    assert first.outputs[0].sha256 != first.outputs[1].sha256  # one colour per image
    for output in first.outputs:
        data = asyncio.run(store.get(output.uri))
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and output.mime_type == "image/png"
        assert output.sha256 == hashlib.sha256(data).hexdigest()
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 2

    text = op(2, "text_generation").model_copy(update={"model": "gemini-2.5-flash"})
    [done] = asyncio.run(gen.run(text))
    assert isinstance(done, OperationCompleted)
    [output] = done.outputs
    assert output.text == "Simulated answer: 256 tokens.\n"
    assert asyncio.run(store.get(output.uri)) == output.text.encode()


def test_without_a_store_the_completion_says_how_many_outputs_were_not_kept() -> None:
    from aipipe.schemas.events import OperationCompleted
    from aipipe.streams.generation import Generation
    from aipipe.streams.generation.backoff import PollSchedule
    from aipipe.streams.generation.guard import ProviderGuard

    gen = Generation({"simulated": SimulatedProvider()}, ProviderGuard(), PollSchedule())
    image = op(1).model_copy(update={"model": "gemini-2.5-flash-image",
                                     "params": {"prompt": "p", "n": 3}})
    [done] = asyncio.run(gen.run(image))
    assert isinstance(done, OperationCompleted) and done.success
    assert done.outputs == [] and done.metadata["outputs_not_stored"] == 3
