"""The provider port: what generation needs from an AI provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.events import OperationAdmitted, Usage


@dataclass(frozen=True)
class ProviderResult:
    success: bool
    usage: Usage
    error_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class AIProvider(Protocol):
    name: str

    async def generate(self, operation: OperationAdmitted) -> ProviderResult:
        """Run the operation; report failure in the result, raise only on a bug."""
        ...
