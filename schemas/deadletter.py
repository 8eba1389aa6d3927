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
TRUNCATED = "aipipe.dlq.truncated_from"

#: A dead letter carries at most this much of the original value, so that it always fits
#: in a Kafka request with its headers, whatever the rejected message was.
MAX_VALUE_BYTES = 512 * 1024


MAX_KEPT_HEADER_BYTES = 64 * 1024


def kept_headers(original: Iterable[tuple[str, str | bytes | None]] | None) -> Headers:
    """The original headers a dead letter keeps: all of them, unless they are oversized."""
    headers = list(original or [])
    size = sum(len(name) + len(value or b"") for name, value in headers)
    return headers if size <= MAX_KEPT_HEADER_BYTES else [(TRUNCATED + ".headers", str(size))]


def deadletter_value(value: bytes | None) -> tuple[bytes, Headers]:
    """The value a dead letter carries, and the header that says it was cut, if it was."""
    value = value or b""
    if len(value) <= MAX_VALUE_BYTES:
        return value, []
    return value[:MAX_VALUE_BYTES], [(TRUNCATED, str(len(value)).encode())]


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
