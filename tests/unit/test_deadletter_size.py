"""A dead letter always fits in what the producer sends (1,000,000 bytes), whatever the
message it carries: sending it must never fail, or the worker stops on that message again
after every restart."""

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from aipipe.schemas.deadletter import (
    MAX_REASON_CHARS,
    MAX_VALUE_BYTES,
    REASON,
    TRUNCATED,
    build_dead_letter,
    kept_headers,
    read_headers,
)
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import MAX_EVENT_BYTES, OperationRequested, decode, encode

PRODUCER_LIMIT = 1_000_000


def record_bytes(key: bytes, value: bytes, headers: list[tuple[str, str | bytes | None]]) -> int:
    return len(key) + len(value) + sum(len(n.encode()) + len(v or b"") + 10 for n, v in headers)


def dead_letter(value: bytes, headers: list[tuple[str, str | bytes | None]]) -> tuple[str, int]:
    """The reason and size of the dead letter of ``value``, which the streams' Kafka client
    (aiokafka, whose header values must be bytes) takes into a record batch."""
    with pytest.raises(EventDecodeError) as caught:
        decode(value)
    letter = build_dead_letter(b"acme", value, headers, reason=caught.value.reason,
                               error="EventDecodeError", stage="admission",
                               topic="aipipe.operation.requested", partition=0, offset=7)
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1, producer_epoch=-1,
        base_sequence=-1, batch_size=PRODUCER_LIMIT)
    assert builder.append(0, timestamp=1, key=letter.key, value=letter.value,
                          headers=letter.headers) is not None
    return read_headers(letter.headers)[REASON], record_bytes(b"acme", letter.value,
                                                              letter.headers)


def test_a_field_name_of_most_of_a_megabyte_gives_a_reason_of_one_sentence() -> None:
    request = orjson.loads(encode(OperationRequested(
        client_id="acme", request_id="r1", operation_type="image_generation",
        model="gemini-2.5-flash-image", params={"prompt": "a lighthouse"})))
    request["k" * 990_000] = 1  # not a field: refused, and named in the reason
    value = orjson.dumps(request)
    assert len(value) <= MAX_EVENT_BYTES
    reason, size = dead_letter(value, [])
    assert len(reason) <= MAX_REASON_CHARS + 50 and reason.startswith("Field 'kkkk")
    assert size < PRODUCER_LIMIT


def test_many_empty_headers_are_counted_and_replaced_by_their_count() -> None:
    headers: list[tuple[str, str | bytes | None]] = [("", None)] * 300_000
    kept = kept_headers(headers)
    assert kept == [(TRUNCATED + ".headers", b"300000 headers")]
    _, size = dead_letter(b"not json", headers)
    assert size < PRODUCER_LIMIT


def test_a_few_ordinary_headers_are_kept_as_they_came() -> None:
    headers: list[tuple[str, str | bytes | None]] = [("traceparent", b"00-" + b"1" * 52),
                                                      ("x", None)]
    assert kept_headers(headers) == headers


FORGED: list[tuple[str, str | bytes | None]] = [
    ("aipipe.dlq.reason", b"nothing wrong here"), ("aipipe.dlq.offset", b"0"),
    ("aipipe.dlq.truncated_from", b"999999"), ("aipipe.dlq.truncated_from.headers", b"1"),
    ("aipipe.dlq.stage", None), ("traceparent", b"00-" + b"1" * 52)]


@pytest.mark.parametrize("value_bytes", [10, MAX_VALUE_BYTES + 1])
def test_forged_dead_letter_headers_are_dropped_and_each_is_the_pipelines_once(
    value_bytes: int,
) -> None:
    letter = build_dead_letter(b"acme", b"x" * value_bytes, FORGED, reason="Bad.",
                               error="EventDecodeError", stage="admission",
                               topic="aipipe.operation.requested", partition=3, offset=7)
    ours = [(name, value) for name, value in letter.headers if name.startswith("aipipe.dlq.")]
    cut = [(TRUNCATED, str(value_bytes).encode())] if value_bytes > MAX_VALUE_BYTES else []
    assert sorted(ours) == sorted([
        (REASON, b"Bad."), ("aipipe.dlq.error", b"EventDecodeError"),
        ("aipipe.dlq.stage", b"admission"), ("aipipe.dlq.topic", b"aipipe.operation.requested"),
        ("aipipe.dlq.partition", b"3"), ("aipipe.dlq.offset", b"7"), *cut])
    assert ("traceparent", b"00-" + b"1" * 52) in letter.headers
