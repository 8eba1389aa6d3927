"""Generation: run admitted operations against a provider and record what they cost."""

from streams.generation.complete import completed
from streams.generation.provider import AIProvider, ProviderResult
from streams.generation.simulated import SimulatedProvider, simulated_usage

__all__ = ["AIProvider", "ProviderResult", "SimulatedProvider", "completed", "simulated_usage"]
