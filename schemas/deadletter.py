"""The headers a dead-lettered message carries: why it failed and where it came from.

The value and key are the original bytes, untouched, so the message can be fixed and
re-sent; the original headers are kept and these are added.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Headers = list[tuple[str, str | bytes | None]]

REASON = "aipipe.dlq.reason"
ERROR = "aipipe.dlq.error"
STAGE = "aipipe.dlq.stage"
TOPIC = "aipipe.dlq.topic"
PARTITION = "aipipe.dlq.partition"
OFFSET = "aipipe.dlq.offset"


def deadletter_headers(
    *,
    reason: str,
    error: str,
    stage: str,
    topic: str,
    partition: int,
    offset: int,
    original: Iterable[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] = (),
) -> Headers:
    kept = original.items() if isinstance(original, Mapping) else original
    return [
        *kept,
        (REASON, reason.encode()),
        (ERROR, error.encode()),
        (STAGE, stage.encode()),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
    ]


def read_headers(headers: Iterable[tuple[str, str | bytes | None]] | None) -> dict[str, str]:
    """Headers as a dict of text (the last value wins), for tools and tests."""
    return {
        name: value if isinstance(value, str) else (value or b"").decode(errors="replace")
        for name, value in headers or []
    }
