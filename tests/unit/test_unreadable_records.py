"""A record aiokafka cannot parse (a header name that is not UTF-8), inside a batch.

aiokafka's own readers parse the real record batches built here; only the fetcher's
assignment state is a stand-in.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.consumer.fetcher import Fetcher, FetchResult, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder, _DefaultRecordBatchPy
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.structs import TopicPartition

from aipipe.streams import consumer

TP = TopicPartition("requested", 0)
BAD = b"\xff\xfe"


def batch(base: int, values: list[bytes], bad: set[int], compression: int = 0
          ) -> tuple[int, bytes]:
    """One record batch from offset ``base``; the records at the indexes ``bad`` carry a
    header name that is not UTF-8 (the builder takes only str names: the bytes of a
    placeholder name are swapped after)."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=compression, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1, key=b"k", value=value,
                       headers=[("QQ" if i in bad else "ok", b"1")])
    data = bytearray(builder.build())
    data[0:8] = base.to_bytes(8, "big")  # (base_offset leads the batch, outside its CRC)
    if compression == 0:
        data = bytearray(bytes(data).replace(b"QQ", BAD))
    return base + len(values), bytes(data)


class _State:
    position, paused = 0, False

    def consumed_to(self, offset: int) -> None:
        self.position = offset


class _Assignment:
    active = True

    def __init__(self) -> None:
        self.state = _State()

    def state_value(self, tp: Any) -> _State:
        return self.state


def fetch_all(*batches: tuple[int, bytes], max_records: int | None = None,
              reader: Any = consumer._KeptMemoryRecords) -> list[tuple[int, bytes | None]]:
    """Fetch the partition as aiokafka's fetcher does, each time from its position, given
    ``(next_offset, batch)`` pairs: the broker answers with the batches that end after the
    position. (offset, value) of every record handed on, once the broker has none left."""
    assignment, seen = _Assignment(), []
    for _ in range(20):
        position = assignment.state.position
        data = b"".join(b for after, b in batches if after > position)
        if not data:
            return seen
        records = PartitionRecords(TP, reader(data), [], position,
                                   None, None, False, 0)
        result = FetchResult(TP, assignment=assignment, partition_records=records, backoff=0)
        got = consumer._getall(result, max_records)
        seen += [(r.offset, r.value) for r in got]
    raise AssertionError(f"the partition did not settle: {seen}")


def stand_in(offset: int) -> tuple[int, None]:
    return offset, None


class _PurePythonRecords(_MemoryRecordsPy):
    """aiokafka's reader without its C extension (``AIOKAFKA_NO_EXTENSIONS``), which wraps
    the UnicodeDecodeError in a CorruptRecordException."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.raw = data

    def next_batch(self, *args: Any) -> Any:
        data = self._next_slice
        super().next_batch()
        return _DefaultRecordBatchPy(data)


@pytest.mark.parametrize("reader", [consumer._KeptMemoryRecords, _PurePythonRecords])
def test_only_the_unreadable_record_of_a_batch_is_a_stand_in(reader: Any) -> None:
    handed_on = fetch_all(batch(0, [b"v0", b"v1", b"v2", b"v3"], bad={1}), reader=reader)
    assert handed_on == [(0, b"v0"), stand_in(1), (2, b"v2"), (3, b"v3")]


def test_two_unreadable_records_in_a_row_and_another_batch_after() -> None:
    first, second = batch(10, [b"a", b"b", b"c", b"d"], bad={1, 2}), batch(14, [b"e", b"f"], set())
    assert fetch_all(first, second) == [
        (10, b"a"), stand_in(11), stand_in(12), (13, b"d"), (14, b"e"), (15, b"f")]


@pytest.mark.parametrize("max_records", [1, 2, 500])
def test_fetches_of_a_few_records_at_a_time_hand_each_on_once(max_records: int) -> None:
    first, second = batch(0, [b"v0"], bad=set()), batch(1, [b"v1", b"v2", b"v3"], bad={0})
    handed_on = fetch_all(first, second, max_records=max_records)
    assert handed_on == [(0, b"v0"), stand_in(1), (2, b"v2"), (3, b"v3")]


def test_the_first_record_of_a_later_batch() -> None:
    first, second = batch(0, [b"v0", b"v1"], bad=set()), batch(2, [b"v2", b"v3"], bad={0})
    assert fetch_all(first, second) == [(0, b"v0"), (1, b"v1"), stand_in(2), (3, b"v3")]


class _Subscriptions:
    reassignment_in_progress = False

    def is_assigned(self, tp: Any) -> bool:
        return True


class _Fetcher:
    """What aiokafka's ``Fetcher.fetched_records`` reads of its fetcher."""

    _wait_consume_future = None

    def __init__(self, results: dict[Any, Any]) -> None:
        self._records, self._subscriptions = results, _Subscriptions()

    def _notify(self, future: Any) -> None:
        pass


def test_the_fetcher_gets_no_more_records_than_it_asked_for(monkeypatch: Any) -> None:
    """A batch read around its unreadable record is handed on a poll's worth at a time:
    aiokafka's fetcher asserts it got at most ``max_records``, and the worker died on a
    600-record batch whose first record was unreadable (and again after each restart)."""
    monkeypatch.setattr(FetchResult, "getall", consumer._getall)
    bad = {0, 550}
    after, data = batch(0, [b"v%d" % i for i in range(600)], bad=bad)
    assignment, seen, sizes = _Assignment(), [], []
    while assignment.state.position < after:
        records = PartitionRecords(TP, consumer._KeptMemoryRecords(data), [],
                                   assignment.state.position, None, None, False, 0)
        fetcher = _Fetcher({TP: FetchResult(TP, assignment=assignment,
                                            partition_records=records, backoff=0)})
        got = asyncio.run(Fetcher.fetched_records(fetcher, [TP], timeout=0, max_records=500))
        sizes.append(len(got[TP]))
        seen += [(r.offset, r.value) for r in got[TP]]
    assert sizes == [500, 100]
    assert seen == [(i, None if i in bad else b"v%d" % i) for i in range(600)]


# -- a batch that decompresses past MAX_BATCH_BYTES (a decompression bomb), or not at all ----

CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


@pytest.fixture
def bounded_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoders ``use_safe_seek_consumer`` installs, in both of aiokafka's readers, and
    a 4 MB bound (the batches below hold 8 MB of zeros)."""
    from aiokafka.record import default_records as py_module
    from aiokafka.record._crecords import default_records as c_module

    monkeypatch.setattr(consumer, "MAX_BATCH_BYTES", 4 << 20)
    for module in (c_module, py_module):
        for name, decode in consumer._DECODERS.items():
            monkeypatch.setattr(module, name, decode)


def zeros(base: int, records: int, codec: int) -> tuple[int, bytes]:
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=codec, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 30)
    for i in range(records):
        builder.append(i, timestamp=1, key=b"k", value=bytes(2 << 20), headers=[])
    data = bytearray(builder.build())
    data[0:8] = base.to_bytes(8, "big")
    return base + records, bytes(data)


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_past_the_bound_is_one_stand_in_and_the_partition_goes_on(
    codec: str, bounded_decoders: None,
) -> None:
    """Sixteen records of 2 MB of zeros (150 kB on the wire at most, but for snappy's 1.5 MB;
    with zstd, 1 MB on the wire is gigabytes): one stand-in at the batch's first offset,
    whose reason says why, the batch's other offsets noted as holding no record, and the
    next batch's records after it; the memory held is bounded by the bound, not by what
    the batch would become."""
    import tracemalloc

    consumer.SKIPPED.clear()
    before, after = batch(0, [b"v0"], bad=set()), batch(17, [b"v17"], bad=set())
    bomb = zeros(1, 16, CODECS[codec])
    assert len(bomb[1]) < 2 << 20  # (snappy's 1.5 MB; the others' under 150 kB)
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(consumer, "_noted_topics", frozenset({TP.topic}))
            handed_on = fetch_all(before, bomb, after)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert handed_on == [(0, b"v0"), stand_in(1), (17, b"v17")]
    reason = consumer.stand_in_reason(TP.topic, TP.partition, 1)
    assert reason is not None and reason.startswith(
        f"The record batch at offsets 1 to 16 of this partition was skipped unread: it "
        f"decompresses ({codec}) past 4 MB;")
    assert (TP, 2, 17) in consumer.SKIPPED
    assert peak < 24 << 20  # (aiokafka's own decoders held the whole 32 MB)
    consumer.SKIPPED.clear()


@pytest.mark.parametrize("codec", CODECS)
def test_a_compressed_batch_within_the_bound_is_read_as_before(
    codec: str, bounded_decoders: None,
) -> None:
    _, data = zeros(0, 1, CODECS[codec])
    assert fetch_all((1, data)) == [(0, bytes(2 << 20))]


def test_a_corrupt_compressed_batch_is_a_stand_in_that_says_so(bounded_decoders: None) -> None:
    after, data = zeros(0, 1, CODECS["zstd"])
    corrupt = bytearray(data)
    corrupt[-8:] = b"\xff" * 8  # (the CRC covers it: aiokafka's readers do not check it)
    handed_on = fetch_all((after, bytes(corrupt)), batch(1, [b"v1"], bad=set()))
    assert handed_on == [stand_in(0), (1, b"v1")]
    reason = consumer.stand_in_reason(TP.topic, TP.partition, 0)
    assert reason is not None and "its zstd data is corrupt" in reason


def test_a_record_that_only_looks_like_a_stand_in_is_not_taken_for_one() -> None:
    """A sender's record with no value and the stand-ins' header is its own record."""
    assert consumer.stand_in_reason(TP.topic, TP.partition, 123_456) is None
