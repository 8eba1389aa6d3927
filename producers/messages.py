"""Reading confluent-kafka messages whose headers may be unreadable.

confluent-kafka decodes header names as UTF-8, and a Kafka record's header name is any
bytes (kcat sends them): for another name, ``headers()`` raises, or returns a list holding
a pair without its name (a NULL pointer that crashes the interpreter when read) with the
decoding error left pending, and returns that list again on the next call. A message is
therefore asked for its headers once, through ``readable``, and one whose headers cannot
be read goes on as ``Headerless``.
"""

from __future__ import annotations

import gc
import operator
from typing import Any, cast

import structlog
from confluent_kafka import Message

log = structlog.get_logger("aipipe.messages")

#: ``headers()`` called through the C API's checked path: a result returned with an
#: error pending raises there (the interpreter's specialised call of a method skips that
#: check, and the error surfaced later, in whatever ran next)
_HEADERS = operator.methodcaller("headers")


class Headerless:
    """A message whose headers cannot be read, as one without headers; all else as it
    came. (A sink's thread had ended on the raise, and the process with it, again after
    every restart; a second ``headers()`` call crashed the interpreter.)"""

    def __init__(self, message: Message) -> None:
        self.message = message

    def headers(self) -> list[tuple[str, bytes | None]]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def readable(message: Message) -> Message:
    """``message``, or it as ``Headerless`` when its headers cannot be read. The pairs are
    checked through the garbage collector's view of them, which skips a missing name."""
    try:
        whole = _whole(_HEADERS(message))
    except (UnicodeDecodeError, SystemError):
        whole = False
    if not whole:
        log.warning("kafka_headers_unreadable", topic=message.topic(),
                    partition=message.partition(), offset=message.offset())
        return cast(Message, Headerless(message))
    return message


def _whole(headers: Any) -> bool:
    """Whether a ``headers()`` list has every pair, each with its name and value."""
    if not isinstance(headers, list):
        return True  # None: no headers
    pairs = gc.get_referents(headers)
    return len(pairs) == len(headers) and all(
        isinstance(pair, tuple) and len(gc.get_referents(pair)) == len(pair) for pair in pairs)
