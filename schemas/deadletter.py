"""The headers a dead-lettered message carries: why it failed and where it came from.

The value and key are the original bytes, untouched, so the message can be fixed and
re-sent; the original headers are kept and these are added.
"""

from __future__ import annotations

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
    original: list[tuple[str, bytes]] | None = None,
) -> list[tuple[str, bytes]]:
    return [
        *(original or []),
        (REASON, reason.encode()),
        (ERROR, error.encode()),
        (STAGE, stage.encode()),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
    ]


def read_headers(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers as a dict of text (the last value wins), for tools and tests."""
    return {name: (value or b"").decode(errors="replace") for name, value in headers or []}
