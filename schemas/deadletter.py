"""A dead-lettered message: why it failed and where it came from, and what it held.

The key and value are the original bytes, so the message can be fixed and re-sent, cut
only where they would not fit (``dead_letter``); the original headers are kept (or, when
too many or too large, counted) and these are added. An ``aipipe.dlq.`` name is the
pipeline's alone: an original header with one is dropped, so each is there once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Headers = list[tuple[str, str | bytes | None]]

PREFIX = "aipipe.dlq."  # the names of the headers below, and only theirs
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
MAX_KEPT_HEADERS = 100
#: the bytes a record header costs beside its name and value (lengths and count as varints)
HEADER_OVERHEAD_BYTES = 10
#: the characters of a reason (or an error's name) a dead letter carries: a reason names a
#: field, and a hostile event's field name can be most of a megabyte
MAX_REASON_CHARS = 1000
MAX_KEY_BYTES = 1024  # of the original key


def kept_headers(original: Iterable[tuple[str, str | bytes | None]] | None) -> Headers:
    """The original headers a dead letter keeps: all of them, unless they are too many or
    too large (in bytes, each header's own cost counted, an empty one's too), but for those
    named as the dead letter's own (``PREFIX``).

    Those are dropped, not renamed: a sender could otherwise forge the reason, offset or
    ``truncated_from`` a reader takes first, and a renamed one would still be under
    ``PREFIX`` (and grow a prefix each time a re-sent dead letter failed again).
    """
    headers = list(original or [])
    kept = [(name, value) for name, value in headers[:MAX_KEPT_HEADERS + 1]
            if not name.startswith(PREFIX)]
    size = sum(len(name.encode(errors="replace")) + len(value or b"") + HEADER_OVERHEAD_BYTES
               for name, value in kept)
    if len(headers) <= MAX_KEPT_HEADERS and size <= MAX_KEPT_HEADER_BYTES:
        return kept
    return [(TRUNCATED + ".headers", f"{len(headers)} headers".encode())]


def cut_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` at most ``limit`` characters, the rest said, not kept (also a provider's
    strings in a completion: ``streams.generation.complete.cut``)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


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
    """The reason and coordinates after ``original``: what ``kept_headers`` keeps of the
    message's own, which holds no ``PREFIX`` name, and the value's cut."""
    kept = original.items() if isinstance(original, Mapping) else original
    return [
        *kept,
        (REASON, cut_reason(reason).encode()),
        (ERROR, cut_reason(error, 200).encode()),
        (STAGE, stage.encode()),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
    ]


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: Headers


def build_dead_letter(
    key: bytes | None, value: bytes | None,
    headers: Iterable[tuple[str, str | bytes | None]] | None, *,
    reason: str, error: str, stage: str, topic: str, partition: int, offset: int,
) -> DeadLetter:
    """The dead letter of one message, which always fits in a Kafka request: its key cut to
    ``MAX_KEY_BYTES``, its value to ``MAX_VALUE_BYTES``, its headers kept as
    ``kept_headers`` says, and the reason and coordinates added."""
    kept, cut = deadletter_value(value)
    return DeadLetter(
        key[:MAX_KEY_BYTES] if key else key, kept,
        deadletter_headers(reason=reason, error=error, stage=stage, topic=topic,
                           partition=partition, offset=offset,
                           original=[*kept_headers(headers), *cut]))


def read_headers(headers: Iterable[tuple[str, str | bytes | None]] | None) -> dict[str, str]:
    """Headers as a dict of text (the last value wins), for tools and tests."""
    return {
        name: value if isinstance(value, str) else (value or b"").decode(errors="replace")
        for name, value in headers or []
    }
