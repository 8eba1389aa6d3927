"""The sink's error policy: classification, splitting, backoff, and the flush that uses them.

The flush tests drive ``BatchingSink`` with in-memory stand-ins for the Kafka consumer,
the dead-letter producer and the store (the real ones are in tests/e2e/test_sink_faults.py);
the exceptions are the ones clickhouse-connect and chDB raise, with their real messages.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)

from aipipe.consumers.costs.store import StoreError
from aipipe.consumers.sink import (
    Batch,
    BatchingSink,
    FailureKind,
    FaultPoints,
    InjectedFault,
    SinkFatalError,
    backoff_delay,
    classify,
    content_digest,
    halves,
    message_digest,
    ranges_token,
)
from aipipe.schemas.deadletter import read_headers
from aipipe.schemas.errors import EventDecodeError

PARTITIONS = (
    "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). "
    "The limit is controlled by 'max_partitions_per_insert_block' setting. Large number of "
    "partitions is a common misconception. (TOO_MANY_PARTS) (version 26.9.0.1)"
)


def raised(make: Callable[[], BaseException], cause: BaseException | None = None) -> BaseException:
    """``make()`` as it looks once raised (from ``cause``), chain and all."""
    try:
        if cause is None:
            raise make()
        try:
            raise cause
        except BaseException as inner:
            raise make() from inner
    except BaseException as exc:
        return exc


def store_error(cause: BaseException) -> BaseException:
    return raised(lambda: StoreError(f"ClickHouse could not insert 3 rows: {cause}"), cause)


# -- pure parts --------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    assert [backoff_delay(n, 0.5, 30.0) for n in range(1, 10)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0


def test_halves_split_in_two_and_keep_order() -> None:
    assert halves([1, 2, 3, 4, 5]) == ([1, 2], [3, 4, 5])
    assert halves([1, 2]) == ([1], [2])


def test_a_part_token_names_its_offset_runs_and_a_whole_run_reads_like_the_batch_token() -> None:
    messages = [("t", 1, 9, b"d"), ("t", 0, 3, b"a"), ("t", 0, 4, b"b"), ("t", 0, 7, b"c")]
    ranges, digest = ranges_token(messages).split("#")
    assert ranges == "t:0:3-4,7-7;t:1:9-9"
    assert digest == content_digest(((t, p, o), d) for t, p, o, d in messages)
    assert ranges_token(reversed(messages)) == ranges_token(messages)
    batch = Batch()
    for topic, partition, offset, digest_ in messages[1:3] + messages[:1]:
        batch.track(topic, partition, offset, now=0.0, digest=digest_)
    assert batch.dedup_token() == ranges_token(messages[1:3] + messages[:1])


def test_a_message_digest_covers_what_rows_are_made_of() -> None:
    one = message_digest(Msg(0, 5, b"v"))  # type: ignore[arg-type]
    assert one == message_digest(Msg(0, 5, b"v"))  # type: ignore[arg-type]
    assert one != message_digest(Msg(0, 5, b"w"))  # type: ignore[arg-type]
    assert one != message_digest(Msg(0, 6, b"v"))  # type: ignore[arg-type]  # its timestamp


class Described:
    """A message with every kind of field: bytes and str headers, a header without a value."""

    def headers(self) -> list[tuple[str, bytes | str | None]]:
        return [("request_id", b"req-1"), ("traceparent", "00-ab"), ("empty", None)]

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_764_547_200_000

    def key(self) -> bytes:
        return b"acme"

    def value(self) -> bytes:
        return b'{"event_type":"operation.completed"}'


def test_digests_stay_what_earlier_versions_computed() -> None:
    # a batch retried by a newer worker must carry the token an older one gave it, or
    # ClickHouse's deduplication would take the retry for new rows
    assert message_digest(Described()).hex() == "ddf8745beb21be18d43bdb8a8ce94626"  # type: ignore[arg-type]
    assert content_digest([(("t", 1, 9), b"d"), (("t", 0, 3), b"a")]) == \
        "71952ed5eb2308cda54685899ed9e6ef"


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        # ClickHouse refuses the data: split the batch
        (store_error(DatabaseError(PARTITIONS, code=252, name="TOO_MANY_PARTS")),
         FailureKind.REJECTED, "Too many partitions for single INSERT block (more than 100)."),
        (store_error(raised(lambda: DataError(
            "Unable to create native array for column `input_tokens`: error"),
            struct.error("argument out of range"))),
         FailureKind.REJECTED, "Unable to create native array for column `input_tokens`: error."),
        (raised(lambda: RecursionError("maximum recursion depth exceeded")),
         FailureKind.REJECTED, "maximum recursion depth exceeded."),
        (raised(lambda: OverflowError("date value out of range")),
         FailureKind.REJECTED, "date value out of range."),
        # not now: retry the same rows with the same token
        (store_error(raised(lambda: OperationalError(
            "Error HTTPConnectionPool(host='ch', port=8123): Max retries exceeded executing "
            "HTTP request attempt 1 (http://ch:8123)"),
            ConnectionRefusedError(111, "Connection refused"))),
         FailureKind.TRANSIENT, None),
        (raised(lambda: ConnectionResetError(104, "Connection reset by peer")),
         FailureKind.TRANSIENT, None),
        (raised(lambda: TimeoutError("timed out")), FailureKind.TRANSIENT, None),
        (store_error(DatabaseError("HTTP driver received HTTP status 503, server response: "
                                   "unavailable")), FailureKind.TRANSIENT, None),
        (store_error(DatabaseError(
            "Code: 252. DB::Exception: Too many parts (3001). Merges are processing "
            "significantly slower than inserts. (TOO_MANY_PARTS)", code=252)),
         FailureKind.TRANSIENT, None),
        (store_error(DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded. "
                                   "(MEMORY_LIMIT_EXCEEDED)", code=241)),
         FailureKind.TRANSIENT, None),
        (store_error(DatabaseError("Code: 159. DB::Exception: Timeout exceeded. "
                                   "(TIMEOUT_EXCEEDED)")), FailureKind.TRANSIENT, None),
        # the engine or the client is unusable: the process must restart
        (store_error(DatabaseError("Code: 236. DB::Exception: The server is shutting down due "
                                   "to a fatal error. (ABORTED)", code=236)),
         FailureKind.FATAL, "The server is shutting down due to a fatal error."),
        (store_error(ProgrammingError("The client has been closed")), FailureKind.FATAL, None),
        (store_error(DatabaseError("Code: 60. DB::Exception: Table aipipe.ai_cost_tracking "
                                   "does not exist. (UNKNOWN_TABLE)", code=60)),
         FailureKind.FATAL, None),
        (raised(lambda: MemoryError()), FailureKind.FATAL, None),
    ],
)
def test_a_failed_write_is_classified_by_what_it_says(
    error: BaseException, kind: FailureKind, reason: str | None
) -> None:
    failure = classify(error)
    assert failure.kind is kind
    if reason is not None:
        assert failure.reason == reason


def test_store_unavailable_writes_once_then_refuses_for_its_seconds() -> None:
    now = [100.0]
    faults = FaultPoints("store_unavailable@2:5", clock=lambda: now[0])
    writes: list[float] = []

    def write() -> None:
        writes.append(now[0])

    faults.write(write)  # the first write is untouched
    with pytest.raises(OperationalError) as refused:
        faults.write(write)  # reaches the store, the acknowledgement is lost
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
    assert classify(refused.value).kind is FailureKind.TRANSIENT
    now[0] = 104.9
    with pytest.raises(OperationalError):
        faults.write(write)
    now[0] = 105.0
    faults.write(write)
    assert writes == [100.0, 100.0, 105.0]


def test_sink_raise_raises_at_the_nth_flush_only() -> None:
    faults = FaultPoints("sink_raise@2")
    faults.reached("sink_raise")
    faults.reached("before_insert")
    with pytest.raises(InjectedFault):
        faults.reached("sink_raise")
    faults.reached("sink_raise")


# -- the flush, with in-memory Kafka clients and store -----------------------------------


class Msg:
    def __init__(self, partition: int, offset: int, value: bytes, topic: str = "t") -> None:
        self._topic, self._partition, self._offset, self._value = topic, partition, offset, value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"k"

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_764_000_000_000 + self._offset

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return [("request_id", b"r")]


class FakeConsumer:
    """Time passes only while it is polled; ``during_poll`` runs inside a poll."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.polls: list[float] = []
        self.paused: list[Any] = []
        self.resumed: list[Any] = []
        self.commits: list[list[tuple[str, int, int]]] = []
        self.during_poll: Callable[[], None] = lambda: None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Msg]:
        self.polls.append(timeout)
        self.clock[0] += timeout
        self.during_poll()
        return []

    def assignment(self) -> list[str]:
        return ["t/0", "t/1"]

    def pause(self, partitions: list[Any]) -> None:
        self.paused.append(partitions)

    def resume(self, partitions: list[Any]) -> None:
        self.resumed.append(partitions)

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits.append(sorted((o.topic, o.partition, o.offset) for o in offsets))

    def close(self) -> None:
        pass


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []
        self.flushed = 0

    def send_raw(self, topic: str, key: bytes, value: bytes, headers: Any) -> None:
        self.sent.append((topic, value, read_headers(headers)))

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        pass


class Projection:
    """Rows are the message values; ``fail`` decides what a write raises, if anything."""

    stage = "costs"

    def __init__(self, fail: Callable[[Sequence[bytes]], BaseException | None]) -> None:
        self.fail = fail
        self.tokens: list[str] = []  # as written: offset ranges, then the messages' digest
        self.attempts: list[str] = []  # the offset ranges of each attempt's token
        self.written: dict[str, list[bytes]] = {}

    def rows(self, message: Msg) -> list[bytes]:
        value = message.value()
        if value == b"deep":
            raise RecursionError("maximum recursion depth exceeded while encoding metadata")
        if value == b"undecodable":
            raise EventDecodeError("The message is not valid JSON; send a JSON object.")
        return [value]

    def write(self, rows: Sequence[bytes], dedup_token: str) -> None:
        ranges, digest = dedup_token.split("#")
        assert re.fullmatch(r"[0-9a-f]{32}", digest)
        self.tokens.append(dedup_token)
        self.attempts.append(ranges)
        error = self.fail(rows)
        if error is not None:
            raise error
        self.written[ranges] = list(rows)


def sink_with(projection: Projection) -> tuple[BatchingSink[bytes], FakeConsumer, FakeProducer,
                                               list[BaseException]]:
    clock = [0.0]
    consumer, producer, reports = FakeConsumer(clock), FakeProducer(), []
    sink: BatchingSink[bytes] = BatchingSink(
        bootstrap="unused:9092", topics=["t"], deadletter_topic="dlq", group_id="g",
        projection=projection, retry_base_seconds=0.5, retry_cap_seconds=30.0,
        report=reports.append, clock=lambda: clock[0],
        consumer=consumer,  # type: ignore[arg-type]
        deadletters=producer,  # type: ignore[arg-type]
    )
    return sink, consumer, producer, reports


def feed(sink: BatchingSink[bytes], values: list[bytes]) -> None:
    for offset, value in enumerate(values):
        sink.add(Msg(offset % 2, offset, value))  # type: ignore[arg-type]


def test_rows_that_cannot_be_made_dead_letter_the_message_and_the_batch_goes_on() -> None:
    projection = Projection(lambda rows: None)
    sink, consumer, producer, reports = sink_with(projection)
    feed(sink, [b"a", b"deep", b"undecodable", b"b"])
    sink.flush()

    assert projection.written == {"t:0:0-2;t:1:1-3": [b"a", b"b"]}
    [(topic, value, deep), (_, _, undecodable)] = producer.sent
    assert (topic, value) == ("dlq", b"deep")
    assert deep["aipipe.dlq.reason"] == (
        "The costs sink could not turn this message into rows (RecursionError: maximum "
        "recursion depth exceeded while encoding metadata); fix the event and send it again.")
    assert deep["aipipe.dlq.error"] == "RecursionError"
    assert (deep["aipipe.dlq.partition"], deep["aipipe.dlq.offset"]) == ("1", "1")
    assert undecodable["aipipe.dlq.reason"] == "The message is not valid JSON; send a JSON object."
    assert [type(e) for e in reports] == [RecursionError]
    assert consumer.commits == [[("t", 0, 3), ("t", 1, 4)]]


def test_a_rejected_batch_is_halved_until_the_refused_messages_stand_alone() -> None:
    refused = raised(lambda: DataError(
        "Unable to create native array for column `input_tokens`: error"),
        struct.error("argument out of range"))
    projection = Projection(lambda rows: store_error(refused) if b"bad" in rows else None)
    sink, consumer, producer, _ = sink_with(projection)
    values = [b"r0", b"r1", b"r2", b"r3", b"r4", b"bad", b"r6", b"r7"]
    feed(sink, values)
    sink.flush()

    assert sorted(r for rows in projection.written.values() for r in rows) == sorted(
        v for v in values if v != b"bad")
    # parts are named by their offsets: the same split after a crash deduplicates
    assert list(projection.written) == ["t:0:0-0,2-2;t:1:1-1,3-3", "t:0:4-4", "t:0:6-6;t:1:7-7"]
    assert projection.attempts[0] == "t:0:0-6;t:1:1-7"
    [(_, value, headers)] = producer.sent
    assert value == b"bad"
    assert headers["aipipe.dlq.reason"] == (
        "ClickHouse refused this message's rows (Unable to create native array for column "
        "`input_tokens`: error); fix the event and send it again.")
    assert headers["aipipe.dlq.error"] == "DataError"
    assert headers["aipipe.dlq.offset"] == "5"
    assert producer.flushed == 1 and consumer.commits == [[("t", 0, 7), ("t", 1, 8)]]


def test_a_transient_failure_is_retried_with_the_same_token_while_the_consumer_polls() -> None:
    failures = [store_error(raised(lambda: OperationalError("Error executing HTTP request"),
                                   ConnectionRefusedError(111, "Connection refused")))] * 3
    projection = Projection(lambda rows: failures.pop() if failures else None)
    sink, consumer, producer, reports = sink_with(projection)
    feed(sink, [b"a", b"b", b"c"])
    sink.flush()

    assert projection.attempts == ["t:0:0-2;t:1:1-1"] * 4
    assert projection.written == {"t:0:0-2;t:1:1-1": [b"a", b"b", b"c"]}
    assert sum(consumer.polls) == pytest.approx(0.5 + 1.0 + 2.0)  # polled through every wait
    assert max(consumer.polls) <= 0.5
    assert len(consumer.paused) == len(consumer.resumed) == 3
    assert len(reports) == 1  # Sentry hears of the outage once
    assert consumer.commits == [[("t", 0, 3), ("t", 1, 2)]] and producer.sent == []


def test_a_fatal_engine_error_ends_the_sink_without_a_commit() -> None:
    fatal = store_error(DatabaseError(
        "Code: 236. DB::Exception: The server is shutting down due to a fatal error. (ABORTED)",
        code=236))
    sink, consumer, producer, _ = sink_with(Projection(lambda rows: fatal))
    feed(sink, [b"a", b"b"])
    with pytest.raises(SinkFatalError, match="shutting down due to a fatal error"):
        sink.flush()
    assert consumer.commits == [] and producer.sent == []


def test_partitions_revoked_during_the_retries_abandon_the_batch_uncommitted() -> None:
    refused = store_error(raised(lambda: ConnectionResetError(104, "Connection reset by peer")))
    projection = Projection(lambda rows: refused)
    sink, consumer, _, _ = sink_with(projection)
    consumer.during_poll = lambda: sink._on_revoke(consumer, [])  # type: ignore[arg-type]
    feed(sink, [b"a", b"b"])
    sink.flush()
    assert consumer.commits == [] and len(projection.attempts) == 1
    assert sink.batch.next_offsets == {} and sink.held == []


def test_a_transient_failure_inside_a_rebalance_leaves_the_batch_to_the_next_owner() -> None:
    refused = store_error(raised(lambda: TimeoutError("timed out")))
    sink, consumer, _, _ = sink_with(Projection(lambda rows: refused))
    feed(sink, [b"a"])
    sink._on_revoke(consumer, [])  # type: ignore[arg-type]
    assert consumer.commits == [] and consumer.polls == []


def test_a_dead_letter_is_never_sent_back_to_the_dead_letter_topic() -> None:
    sink, consumer, producer, _ = sink_with(Projection(lambda rows: None))
    sink.add(Msg(0, 0, b"deep", topic="dlq"))  # type: ignore[arg-type]
    sink.flush()
    assert producer.sent == [] and consumer.commits == [[("dlq", 0, 1)]]
