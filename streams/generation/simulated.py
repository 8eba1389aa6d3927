"""A deterministic, offline provider: usage follows from the request alone.

- every operation: ``input_tokens`` = ceil(len(prompt) / 4)
- image: ``image_count`` = ``params.n`` (default 1), ``output_tokens`` = 1290 per image
- text: ``output_tokens`` = ``params.max_output_tokens`` (default 256)
- video: ``video_seconds`` = ``params.duration_seconds`` (default 8), done on poll
  ``params.simulate.polls`` (default from settings)

Outputs are deterministic too, functions of the request as a cache's would be: an image
is a small PNG whose colour follows from the model, the prompt and the image's index, a
text a short line with its token count. So the artifact path runs in the demo, the tests
and the benchmarks, a re-run yields the very same bytes, and the same request yields the
same object in the content-addressed store (a benchmark does not create a file per
operation).

Scripted per request in ``params.simulate`` (defaults from settings):
``{"latency_ms": 50, "polls": 5, "fail": false}``, bounded by ``max_latency_ms`` and
``max_polls`` (admission refuses more; a request's value past them is cut to them here). A failure
rate from settings fails a fixed share of operations, chosen by a hash of the operation
id, so runs repeat. Offered only where ``AIPIPE_SIMULATED_ENABLED`` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from decimal import Decimal
from typing import Any

from aipipe.schemas.events import OperationAdmitted, Usage
from aipipe.schemas.prices import IMAGE_TOKENS_PER_IMAGE
from aipipe.streams.generation.png import solid_png
from aipipe.streams.generation.provider import (
    ProviderError,
    ProviderOutput,
    ProviderResult,
    VideoJob,
    VideoStatus,
)

FAILURE = "simulated provider failure"


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


def simulated_outputs(operation: OperationAdmitted, usage: Usage) -> tuple[ProviderOutput, ...]:
    """The bytes a simulated image or text operation returns (the same on every run)."""
    if operation.operation_type == "image_generation":
        return tuple(ProviderOutput("image/png", data=simulated_png(operation, i))
                     for i in range(usage.image_count or 0))
    text = f"Simulated answer: {usage.output_tokens or 0} tokens.\n"
    return (ProviderOutput("text/plain", data=text.encode()),)


def simulated_png(operation: OperationAdmitted, index: int) -> bytes:
    """Image ``index`` of a simulated image operation."""
    prompt = str(operation.params.get("prompt", ""))
    return solid_png(f"{operation.model}\n{prompt}\n{index}".encode())


def _share(operation_id: str) -> float:
    """A stable number in [0, 1) for ``operation_id``."""
    digest = hashlib.sha256(operation_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SimulatedProvider:
    name = "simulated"

    def __init__(
        self, latency_ms: int = 0, failure_rate: float = 0.0, video_polls: int = 1,
        max_latency_ms: int = 5_000, max_polls: int = 20,
    ) -> None:
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.video_polls = video_polls
        self.max_latency_ms = max_latency_ms
        self.max_polls = max_polls

    def _script(self, operation: OperationAdmitted) -> dict[str, Any]:
        script = operation.params.get("simulate") or {}
        return script if isinstance(script, dict) else {}

    def _fails(self, operation: OperationAdmitted, script: dict[str, Any]) -> bool:
        if "fail" in script:
            return bool(script["fail"])
        return _share(operation.operation_id) < self.failure_rate

    async def _wait(self, script: dict[str, Any]) -> None:
        latency = self.latency_ms  # the operator's default; a request's own is bounded
        if "latency_ms" in script:
            latency = min(int(script["latency_ms"]), self.max_latency_ms)
        if latency > 0:
            await asyncio.sleep(latency / 1000)  # the simulated call's own duration

    async def generate(self, operation: OperationAdmitted) -> ProviderResult:
        """Image or text in one call (the walking skeleton's entry point)."""
        script = self._script(operation)
        await self._wait(script)
        if self._fails(operation, script):
            return ProviderResult(success=False, usage=Usage(), error_message=FAILURE)
        try:
            usage = simulated_usage(operation.operation_type, operation.params)
        except (TypeError, ValueError, ArithmeticError) as exc:
            return ProviderResult(success=False, usage=Usage(), error_message=f"bad params: {exc}")
        return ProviderResult(success=True, usage=usage, metadata={"simulated": True},
                              outputs=simulated_outputs(operation, usage))

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        return await self.generate(operation)

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult:
        return await self.generate(operation)

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        script = self._script(operation)
        await self._wait(script)
        if self._fails(operation, script):
            raise ProviderError(FAILURE, retryable=False)
        try:
            usage = simulated_usage(operation.operation_type, operation.params)
            polls = self.video_polls
            if "polls" in script:
                polls = min(max(1, int(script["polls"])), self.max_polls)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ProviderError(f"bad params: {exc}", status=400, retryable=False) from exc
        return VideoJob(
            name=f"simulated/operations/{operation.operation_id}",
            metadata={"polls": polls, "usage": usage.model_dump(mode="json")},
        )

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        if attempt < int(job.metadata.get("polls", 1)):
            return VideoStatus(done=False)
        usage = Usage.model_validate(job.metadata.get("usage") or {})
        return VideoStatus(done=True, usage=usage, metadata={"simulated": True})
