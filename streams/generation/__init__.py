"""Generation: run admitted operations against a provider and record what they cost.

Pure decisions (``backoff``, ``breaker``, ``polling``, ``complete``), the provider port
and its adapters (``provider``, ``simulated``, ``gemini``), guarded calls (``guard``),
and ``service.Generation``, which the agents call.
"""

from streams.generation.complete import completed
from streams.generation.provider import (
    AIProvider,
    ProviderError,
    ProviderResult,
    VideoJob,
    VideoStatus,
)
from streams.generation.service import Generation
from streams.generation.simulated import SimulatedProvider, simulated_usage

__all__ = [
    "AIProvider",
    "Generation",
    "ProviderError",
    "ProviderResult",
    "SimulatedProvider",
    "VideoJob",
    "VideoStatus",
    "completed",
    "simulated_usage",
]
