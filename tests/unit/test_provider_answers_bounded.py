"""What a provider answers is bounded before it goes into an event: a completion stays an
event that can be sent (under the producer's 1,000,000 bytes) and decoded (under the depth
limit), whatever the provider's strings and metadata hold."""

import asyncio
from datetime import UTC, datetime
from typing import Any

from aipipe.schemas.events import (
    OperationAdmitted,
    OperationCompleted,
    Usage,
    VideoStarted,
    decode,
    encode,
)
from aipipe.streams.generation import Generation
from aipipe.streams.generation.backoff import PollSchedule
from aipipe.streams.generation.complete import MAX_PROVIDER_TEXT
from aipipe.streams.generation.guard import ProviderGuard, RetryPolicy
from aipipe.streams.generation.provider import ProviderError, ProviderResult, VideoJob

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
HUGE = "x" * 1_200_000


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"end": 1}
    for _ in range(levels):
        value = {"in": value}
    return value


class Hostile:
    """A provider whose answers carry what a broken or hostile one may send."""

    name = "gemini"

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        if isinstance(self.answer, Exception):
            raise self.answer
        result: ProviderResult = self.answer
        return result

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        job: VideoJob = self.answer
        return job


def run(answer: Any, operation_type: str = "image_generation",
        model: str = "gemini-2.5-flash-image") -> list[Any]:
    operation = OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=NOW,
        operation_type=operation_type, provider="gemini", model=model,  # type: ignore[arg-type]
        params={"prompt": "a lighthouse"})
    generation = Generation({"gemini": Hostile(answer)},  # type: ignore[dict-item]
                            ProviderGuard(retry=RetryPolicy(1, 0, 0)), PollSchedule())
    return asyncio.run(generation.run(operation))


def sent(events: list[Any]) -> OperationCompleted:
    [done] = [e for e in events if isinstance(e, OperationCompleted)]
    wire = encode(done)
    assert len(wire) < 100_000
    assert decode(wire) == done  # any consumer can read it
    return done


def test_an_error_of_a_megabyte_is_cut_in_the_completion() -> None:
    done = sent(run(ProviderError(f"gemini: 400 {HUGE}", status=400, retryable=False)))
    assert not done.success and done.error_message is not None
    assert len(done.error_message) < MAX_PROVIDER_TEXT + 100
    assert done.error_message.endswith("more characters)")


def test_metadata_nested_deep_huge_or_odd_becomes_a_small_decodable_object() -> None:
    metadata = {"created": nested(40), "id": HUGE, "count": 10 ** 30,
                "items": list(range(10_000)), "when": NOW}
    answer = ProviderResult(success=True, usage=Usage(output_tokens=1290, image_count=1),
                            metadata=metadata)
    done = sent(run(answer))
    assert done.success and done.cost_usd > 0
    assert done.metadata["count"] == str(10 ** 30)
    assert len(done.metadata["items"]) == 50 and len(done.metadata["id"]) < 1100


def test_a_video_named_past_what_a_poll_carries_fails_instead_of_starting() -> None:
    events = run(VideoJob("operations/" + HUGE, {"deep": nested(40)}), "video_generation",
                 "veo-3.0-fast-generate-001")
    assert not any(isinstance(e, VideoStarted) for e in events)
    done = sent(events)
    assert not done.success and done.metadata["reason"] == "provider_answer_invalid"
    assert done.cost_usd == 0
