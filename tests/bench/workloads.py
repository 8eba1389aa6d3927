"""Realistic events and cost rows for the benchmarks, built before any clock starts.

Requested events are about 300 bytes on the wire, the size the published figures in
``research/performance.md`` are scaled to. Completed events mix the three operation
types so the cost rows have the NULLs and decimals the real table holds.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aipipe.consumers.costs.rows import CostRow, row_from_completed
from aipipe.schemas.events import OperationCompleted, OperationRequested, Usage
from aipipe.schemas.prices import price_table_at

CLIENTS = tuple(f"client-{n:03d}" for n in range(50))
_START = datetime(2026, 11, 1, tzinfo=UTC)
_PROMPT = "A watercolour lighthouse on a cliff at dawn, gulls, soft light, wide shot"


def requested_events(count: int) -> list[OperationRequested]:
    return [
        OperationRequested(
            request_id=str(uuid.uuid4()),
            client_id=CLIENTS[n % len(CLIENTS)],
            user_id=f"user-{n % 997}",
            operation_type="image_generation",
            provider="gemini",
            model="gemini-2.5-flash-image",
            params={"prompt": _PROMPT, "aspect_ratio": "16:9"},
        )
        for n in range(count)
    ]


def completed_events(count: int, seed: int = 0) -> list[OperationCompleted]:
    """``count`` completed operations, distinct per ``seed``; cost priced from usage."""
    table = price_table_at(_START)
    shapes = (
        ("image_generation", "gemini-2.5-flash-image",
         Usage(input_tokens=24, output_tokens=1290, image_count=1)),
        ("text_generation", "gemini-2.5-flash", Usage(input_tokens=812, output_tokens=356)),
        ("video_generation", "veo-3.0-fast-generate-001", Usage(video_seconds=Decimal("8"))),
    )
    events = []
    for n in range(count):
        operation_type, model, usage = shapes[n % len(shapes)]
        requested_at = _START + timedelta(seconds=n % 86_400, milliseconds=n % 1000)
        events.append(
            OperationCompleted(
                request_id=str(uuid.uuid4()),
                client_id=CLIENTS[n % len(CLIENTS)],
                user_id=f"user-{n % 997}",
                operation_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{seed}:{n}")),
                requested_at=requested_at,
                occurred_at=requested_at + timedelta(seconds=3),
                operation_type=operation_type,  # type: ignore[arg-type]
                provider="gemini",
                model=model,
                success=n % 50 != 0,
                error_message=None if n % 50 else "provider returned 503",
                usage=usage,
                cost_usd=table.cost(model, usage),
                price_version=table.version,
                duration_ms=1500 + n % 4000,
                poll_count=4 if operation_type == "video_generation" else 0,
                metadata={"aspect_ratio": "16:9", "region": "us-central1"},
            )
        )
    return events


def cost_rows(count: int, seed: int = 0) -> list[CostRow]:
    return [
        row_from_completed(event, "aipipe.operations.completed", n % 4, n)
        for n, event in enumerate(completed_events(count, seed))
    ]
