"""The providers a worker can call, by the name a request puts in ``provider``.

Only the offered ones are built: those named in ``AIPIPE_PROVIDERS``, and the simulated
one only with ``AIPIPE_SIMULATED_ENABLED=true`` (admission refuses the others, see
``streams/admission/params.py``). Adding a provider is one module implementing
``AIProvider`` (``provider.py``), one line here and its params rules there.

Every provider comes wrapped in ``StoringProvider``: the outputs it returns are stored in
the artifact store named by ``AIPIPE_ARTIFACT_URL`` (default ``AIPIPE_HOME/artifacts``)
before the completion records them.
"""

from __future__ import annotations

from aipipe.infra.settings import Settings
from aipipe.schemas.limits import parse_limit
from aipipe.streams.admission.limits import LimitsSource
from aipipe.streams.artifacts.store import ArtifactStore, store_from_url
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.breaker import BreakerPolicy
from aipipe.streams.generation.gemini import GeminiProvider
from aipipe.streams.generation.guard import Fallbacks, ProviderGuard, RetryPolicy
from aipipe.streams.generation.openai_provider import OpenAIProvider
from aipipe.streams.generation.outputs import StoringProvider
from aipipe.streams.generation.provider import AIProvider
from aipipe.streams.generation.simulated import SimulatedProvider
from aipipe.streams.generation.stability import StabilityProvider


def artifacts_from_settings(settings: Settings) -> ArtifactStore:
    return store_from_url(settings.artifact_url, settings.home,
                          settings.artifact_fsync)


def _names(value: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def providers_from_settings(
    settings: Settings, artifacts: ArtifactStore | None = None
) -> dict[str, AIProvider]:
    """The offered providers, their outputs stored in ``artifacts`` (from settings if None)."""
    store = artifacts if artifacts is not None else artifacts_from_settings(settings)
    return {name: StoringProvider(provider, store)
            for name, provider in _bare_providers(settings).items()}


def _bare_providers(settings: Settings) -> dict[str, AIProvider]:
    offered = set(settings.offered_providers)
    providers: dict[str, AIProvider] = {}
    if "simulated" in offered:
        providers["simulated"] = SimulatedProvider(
            latency_ms=settings.simulated_latency_ms,
            failure_rate=settings.simulated_failure_rate,
            video_polls=settings.simulated_video_polls,
            max_latency_ms=settings.simulated_max_latency_ms,
            max_polls=settings.simulated_max_polls,
        )
    if "gemini" in offered:
        providers["gemini"] = GeminiProvider(
            api_key=settings.gemini_api_key,
            base_url=settings.gemini_base_url,
            vertex_project=settings.vertex_project,
            vertex_location=settings.vertex_location,
            vertex_access_token=settings.vertex_access_token,
            timeout_seconds=settings.gemini_timeout_seconds,
            video_output_buckets=_names(settings.video_output_buckets),
        )
    if "openai" in offered:
        providers["openai"] = OpenAIProvider(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            timeout_seconds=settings.openai_timeout_seconds,
        )
    if "stability" in offered:
        providers["stability"] = StabilityProvider(
            api_key=settings.stability_api_key,
            base_url=settings.stability_base_url,
            timeout_seconds=settings.stability_timeout_seconds,
        )
    return providers


def poll_schedule(settings: Settings) -> PollSchedule:
    return PollSchedule(
        base=settings.video_poll_base_seconds,
        factor=settings.video_poll_factor,
        cap=settings.video_poll_cap_seconds,
        max_total=settings.video_max_wait_seconds,
    )


def fallbacks_from_settings(settings: Settings) -> Fallbacks:
    """The fallbacks of the limits file (``AIPIPE_RATE_LIMITS_FILE``), re-read as it
    changes; none without a file."""
    if settings.rate_limits_file is None:
        return lambda provider, model: ()
    source = LimitsSource(parse_limit(settings.rate_limit, "AIPIPE_RATE_LIMIT"),
                          settings.rate_limits_file, settings.rate_limits_reload_seconds)
    return lambda provider, model: source.current().fallbacks_for(provider, model)


def guard_from_settings(settings: Settings) -> ProviderGuard:
    return ProviderGuard(
        fallbacks=fallbacks_from_settings(settings),
        breaker=BreakerPolicy(
            threshold=settings.breaker_failure_threshold,
            window=settings.breaker_window_seconds,
            cooldown=settings.breaker_cooldown_seconds,
            client_share=settings.breaker_client_share,
        ),
        retry=RetryPolicy(
            attempts=settings.provider_retry_attempts,
            base=settings.provider_retry_base_seconds,
            cap=settings.provider_retry_cap_seconds,
        ),
    )
