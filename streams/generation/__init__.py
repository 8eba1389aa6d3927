"""Generation: run admitted operations against a provider and record what they cost.

Pure decisions (``backoff``, ``breaker``, ``polling``, ``complete``), the provider port
and its adapters (``provider``, ``simulated``, ``gemini``), guarded calls (``guard``),
and ``service.Generation``, which the agents call.
"""

from aipipe.streams.generation.complete import completed
from aipipe.streams.generation.provider import (
    AIProvider,
    ProviderError,
    ProviderResult,
    VideoJob,
    VideoStatus,
)
from aipipe.streams.generation.service import Generation
from aipipe.streams.generation.simulated import SimulatedProvider, simulated_usage

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
