"""A deterministic, offline provider: usage follows from the request alone.

- every operation: ``input_tokens`` = ceil(len(prompt) / 4)
- image: ``image_count`` = ``params.n`` (default 1), ``output_tokens`` = 1290 per image
- text: ``output_tokens`` = ``params.max_output_tokens`` (default 256)
- video: ``video_seconds`` = ``params.duration_seconds`` (default 8)
- ``params.simulate.fail`` true: the operation fails, with no usage billed
- ``params.simulate.latency_ms``: how long the call takes (default from settings)
"""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal
from typing import Any

from schemas.events import OperationAdmitted, Usage
from schemas.prices import IMAGE_TOKENS_PER_IMAGE
from streams.generation.provider import ProviderResult


def simulated_usage(operation_type: str, params: dict[str, Any]) -> Usage:
    prompt = str(params.get("prompt", ""))
    input_tokens = math.ceil(len(prompt) / 4)
    if operation_type == "image_generation":
        images = int(params.get("n", 1))
        return Usage(
            input_tokens=input_tokens,
            output_tokens=IMAGE_TOKENS_PER_IMAGE * images,
            image_count=images,
        )
    if operation_type == "video_generation":
        seconds = Decimal(str(params.get("duration_seconds", 8)))
        return Usage(input_tokens=input_tokens, video_seconds=seconds)
    return Usage(
        input_tokens=input_tokens, output_tokens=int(params.get("max_output_tokens", 256))
    )


class SimulatedProvider:
    name = "simulated"

    def __init__(self, latency_ms: int = 0) -> None:
        self.latency_ms = latency_ms

    async def generate(self, operation: OperationAdmitted) -> ProviderResult:
        script = operation.params.get("simulate") or {}
        latency = int(script.get("latency_ms", self.latency_ms))
        if latency:
            await asyncio.sleep(latency / 1000)
        if script.get("fail"):
            return ProviderResult(
                success=False, usage=Usage(), error_message="simulated provider failure"
            )
        try:
            usage = simulated_usage(operation.operation_type, operation.params)
        except (TypeError, ValueError, ArithmeticError) as exc:
            return ProviderResult(
                success=False, usage=Usage(), error_message=f"bad params: {exc}"
            )
        return ProviderResult(success=True, usage=usage, metadata={"simulated": True})
