"""faust's Kafka consumer, made to never commit past a message no agent has handled.

faust-streaming (0.15) commits, per partition, the end of the first unbroken run of
acknowledged offsets, and loses events at rebalances on a partition that has no
committed offset yet, which is every partition when a pipeline starts:

1. A fetch that returns while the consumer's flow is stopped (a rebalance or a table
   recovery in progress) is dropped, and faust "seeks back to committed offsets". For a
   partition without a committed offset, aiokafka's ``seek_to_committed`` does not seek
   (it seeks only to offsets above 0), so the fetch position stays after the dropped
   records: they are never delivered.
2. faust then commits the end of the first run of acknowledgements it has. With no
   committed offset it does not check where that run starts, so the first commit jumps
   over the dropped records, and the next owner of the partition starts there.
3. Its check that the run starts where the partition's committed offset is lets a gap
   of exactly one offset through (``min(acked) - committed > 1``), and is skipped when
   the committed offset is unknown or 0. With acknowledgements out of order (many
   operations in flight, or already-handled events acknowledged ahead of a batch), it
   commits past a message still being handled.
4. A message taken from an agent's queue while the flow is stopped, or fetched under an
   earlier generation of the group, is skipped and acknowledged all the same, so its
   offset counts as handled; acknowledgements that arrive after a revocation outlive
   it into the next generation.
5. Its fetch loop drops every message below the last offset it handed on (its "read
   offset"). A delivery that waited out a rebalance sets that offset after the seek
   back, from a record of the old position, so the records fetched again from the
   committed offset are dropped below it: a restarted worker then sat idle with its
   committed offset behind the high watermark.

With two workers started on a backlog this lost the first hundreds to thousands of
offsets of some partitions (``tests/e2e/test_scaling.py``), with committed offsets at the
high watermark and no error. ``SafeSeekConsumer`` closes each path:

* a seek back to committed offsets seeks a partition without one to its beginning (the
  pipeline consumes with ``auto_offset_reset=earliest``), so dropped records come again,
  and remembers where each partition's fetch starts;
* a commit covers only the unbroken run of acknowledgements that begins exactly at the
  committed offset (or, before the first commit, where the fetch started);
* a message that no stream took in (never tracked) or that was fetched under an earlier
  generation is never counted as acknowledged: it is fetched again after the seek, and
  every effect is idempotent by ``event_id``;
* the acknowledgement state of the partitions of a new assignment starts empty;
* there is no read-offset filter: a record delivered twice is handled twice, which every
  effect tolerates (idempotent by ``event_id``), and nothing fetched again is dropped;
* offsets that hold no record (a transaction's commit or abort marker, which any
  producer of the requests topic may write) are learnt from what each fetch returned
  (``_note_skipped``), not from the read offset faust used for them, and a commit passes
  them: before, one marker held the partition's committed offset there for good.

``aipipe.streams.app`` keeps a safety net over all of this: a partition committed below its
high watermark while nothing is in flight and nothing arrives is fetched again.
"""

from __future__ import annotations

import collections
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from typing import Any

import cramjam
import structlog
from aiokafka import codec
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.errors import CorruptRecordException
from aiokafka.record import default_records as py_default_records
from aiokafka.record._crecords import default_records as c_default_records
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords, _MemoryRecordsPy
from aiokafka.record.util import decode_varint
from aiokafka.structs import ConsumerRecord
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.utils.functional import consecutive_numbers

log = structlog.get_logger("aipipe.streams.consumer")

#: the header of a stand-in for a record the Kafka client could not read (its reason)
UNREADABLE = "aipipe.unreadable"
UNREADABLE_REASON = (
    "A header name of this record is not UTF-8, which the streams' Kafka client (aiokafka) "
    "cannot read, so it was skipped unread: the record stays at the topic, partition and "
    "offset named here; send header names in UTF-8.")


#: offsets that hold no record, from the fetches (the consumer's thread) to the commits (the
#: event loop): ``(topic partition, first, end)``, the end excluded; bounded (an entry lost
#: here is learnt again when the partition is fetched again: see ``refetch_if_stalled``)
SKIPPED: collections.deque[tuple[Any, int, int]] = collections.deque(maxlen=100_000)
#: the topics whose skipped offsets are noted (those whose offsets the worker commits)
_noted_topics: frozenset[str] = frozenset()


def _note_skipped(tp: Any, start: int, end: int, out: Iterable[Any]) -> None:
    """Note the offsets from ``start`` to ``end`` (the fetch position before and after) that
    none of the records handed on, ``out`` (in offset order), has: they hold no record."""
    if tp.topic not in _noted_topics:
        return
    at = start
    for record in out:
        if record.offset > at:
            SKIPPED.append((tp, at, record.offset))
        at = record.offset + 1
    if end > at:
        SKIPPED.append((tp, at, end))


#: the most a compressed record batch may hold decompressed: far above what producers build
#: (librdkafka's batches are at most 1 MB before compression, an event at most 1 MB), far
#: below what a batch of zeros the broker takes (1 MB compressed) decompresses to, gigabytes
MAX_BATCH_BYTES = 64 << 20

#: stand-ins handed on (``_stand_in``): (topic, partition, offset) -> the reason, so that a
#: stage tells them from a record that only looks like one (no value, the header); bounded
_stand_ins: dict[tuple[str, int, int], str] = {}
_STAND_INS_KEPT = 10_000


class BatchUnreadable(Exception):
    """A compressed record batch that decompresses past ``MAX_BATCH_BYTES``, or not at all."""


def _cramjam_decoder(name: str, module: Any) -> Callable[[Any], bytes]:
    """aiokafka's decoder for ``name``, into a buffer that grows to ``MAX_BATCH_BYTES`` at
    most: cramjam's own ``decompress`` has no bound."""

    def decode(payload: Any) -> bytes:
        data, size = bytes(payload), max(1 << 20, 8 * len(payload))
        while True:
            buffer = bytearray(min(size, MAX_BATCH_BYTES))
            try:
                written = module.decompress_into(data, buffer)
            except cramjam.DecompressionError as exc:
                if "whole buffer" not in str(exc):
                    raise BatchUnreadable(f"its {name} data is corrupt") from exc
                if size >= MAX_BATCH_BYTES:
                    raise BatchUnreadable(
                        f"it decompresses ({name}) past {MAX_BATCH_BYTES >> 20} MB") from exc
                size *= 4
                continue
            return bytes(memoryview(buffer)[:written])

    return decode


def _gzip_decode(payload: Any) -> bytes:
    """aiokafka's gzip decoder (members one after another), within ``MAX_BATCH_BYTES``."""
    data, out, total = bytes(payload), [], 0
    try:
        while data:
            member = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = member.decompress(data, MAX_BATCH_BYTES - total + 1)
            total += len(chunk)
            if total > MAX_BATCH_BYTES:
                raise BatchUnreadable(f"it decompresses (gzip) past {MAX_BATCH_BYTES >> 20} MB")
            if not member.eof:
                raise BatchUnreadable("its gzip data ends early")
            out.append(chunk)
            data = member.unused_data
    except zlib.error as exc:
        raise BatchUnreadable("its gzip data is corrupt") from exc
    return b"".join(out)


def _snappy_decode(payload: Any) -> bytes:
    """aiokafka's snappy decoder, once the lengths the blocks declare (which the format
    holds them to) are within ``MAX_BATCH_BYTES``."""
    data = bytes(payload)
    try:
        if codec._detect_xerial_stream(data):  # 16 bytes of header, then sized blocks
            declared, at = 0, 16
            while at < len(data):
                size = int.from_bytes(data[at:at + 4], "big")
                declared += cramjam.snappy.decompress_raw_len(data[at + 4:at + 4 + size])
                at += 4 + size
        else:
            declared = cramjam.snappy.decompress_raw_len(data)
    except cramjam.DecompressionError as exc:
        raise BatchUnreadable("its snappy data is corrupt") from exc
    if declared > MAX_BATCH_BYTES:
        raise BatchUnreadable(f"it decompresses (snappy) past {MAX_BATCH_BYTES >> 20} MB")
    try:
        return bytes(codec.snappy_decode(data))
    except cramjam.DecompressionError as exc:
        raise BatchUnreadable("its snappy data is corrupt") from exc


_DECODERS = {
    "gzip_decode": _gzip_decode,
    "snappy_decode": _snappy_decode,
    "lz4_decode": _cramjam_decoder("lz4", cramjam.lz4),
    "zstd_decode": _cramjam_decoder("zstd", cramjam.zstd),
}


def stand_in_reason(topic: str, partition: int, offset: int) -> str | None:
    """Why the record at these coordinates was handed on as a stand-in, if it was."""
    return _stand_ins.get((topic, partition, offset))


def _getall(self: Any, max_records: int | None = None) -> list[Any]:
    """aiokafka's ``FetchResult.getall``, except for a record it cannot parse.

    aiokafka decodes header names as strict UTF-8: one record with another header name
    (the broker takes any bytes) raised for its partition on every fetch, which stopped
    faust's fetcher and the worker, and again after each restart. The batch holding it is
    read again around it (``_read_around``): its other records are handed on as they are,
    and the one it cannot parse as a stand-in (no key or value, a ``UNREADABLE`` header
    with the reason) that the stage dead-letters; the partition's fetch goes on after the
    batch."""
    tp = self._topic_partition
    if not self.check_assignment(tp) or not self.has_more():
        return []
    records, out = self._partition_records, []
    start = records.next_fetch_offset
    try:
        for record in records:
            out.append(record)
            if max_records is not None and len(out) >= max_records:
                self._update_position()
                break
        else:
            self._update_position()
            self._partition_records = None
    except (UnicodeDecodeError, CorruptRecordException, BatchUnreadable) as exc:
        # (aiokafka's pure-Python reader wraps the UnicodeDecodeError)
        if isinstance(exc, BatchUnreadable):
            read, records.next_fetch_offset = _skip_batch(
                records, tp, records.next_fetch_offset, str(exc))
        elif isinstance(exc, UnicodeDecodeError) or \
                isinstance(exc.__cause__, UnicodeDecodeError):
            read, records.next_fetch_offset = _read_around(
                records, tp, records.next_fetch_offset)
        else:
            raise
        if max_records is not None and len(out) + len(read) > max_records:
            # never more than asked (aiokafka's fetcher asserts it): the rest is fetched
            # again, and there is room for at least one record, so each pass moves on
            read = read[:max_records - len(out)]
            records.next_fetch_offset = read[-1].offset + 1
        out.extend(read)
        self._update_position()
        self._partition_records = None  # (the rest of that fetch is fetched again)
    _note_skipped(tp, start, records.next_fetch_offset, out)
    return out


class _KeptMemoryRecords(MemoryRecords):  # type: ignore[misc]
    """aiokafka's fetched records, keeping their bytes for ``_read_around``."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.raw = data


def _read_around(records: Any, tp: Any, start: int) -> tuple[list[Any], int]:
    """The records from offset ``start`` to the end of the batch aiokafka could not parse
    (the first batch of the fetch ending after ``start``: those before it were read), with
    a stand-in for each record whose header names are not UTF-8; and the offset after the
    batch.

    aiokafka parses a batch's records before it skips those below the fetch offset, so
    the bad record fails again on every fetch of its batch, even after its stand-in: the
    batch is read here with aiokafka's pure-Python reader, one record at a time."""
    memory = _MemoryRecordsPy(records._records.raw)
    while memory.has_next():
        data = memory._next_slice
        batch = memory.next_batch()
        if batch.next_offset <= start or batch.is_control_batch:
            continue
        batch = _DefaultRecordBatchPy(data)  # (a header names only v2 batches have)
        read = []
        for offset, record in _tolerant(batch):
            if offset < start:
                continue
            if record is None:
                log.error("kafka_record_unreadable", topic=tp.topic, partition=tp.partition,
                          offset=offset)
                read.append(_stand_in(tp, offset))
            else:
                read.append(records._consumer_record(tp, record))
        return read, batch.next_offset
    raise RuntimeError(f"no batch after offset {start} in the fetch of {tp}")


def _skip_batch(records: Any, tp: Any, start: int, why: str) -> tuple[list[Any], int]:
    """One stand-in for the batch that could not be decompressed (the first batch of the
    fetch ending after ``start``), at its first offset not yet handed on, and the offset
    after the batch: its other offsets are skipped (``_note_skipped``), however many records
    it claims to hold."""
    memory = _MemoryRecordsPy(records._records.raw)
    while memory.has_next():
        batch = memory.next_batch()  # (the header only: nothing is decompressed here)
        if batch.next_offset <= start or batch.is_control_batch:
            continue
        first, last = max(start, batch.base_offset), batch.next_offset - 1
        log.error("kafka_batch_unreadable", topic=tp.topic, partition=tp.partition,
                  first_offset=first, last_offset=last, why=why)
        reason = (
            f"The record batch at offsets {first} to {last} of this partition was skipped "
            f"unread: {why}; no producer builds such a batch (at most "
            f"{MAX_BATCH_BYTES >> 20} MB once decompressed). Its records stay at the topic; "
            "send them again in smaller, uncorrupted batches.")
        return [_stand_in(tp, first, reason)], batch.next_offset
    raise RuntimeError(f"no batch after offset {start} in the fetch of {tp}")


def _tolerant(batch: Any) -> Iterator[tuple[int, Any]]:
    """Each record of ``batch`` (aiokafka's pure-Python reader) as ``(offset, record)``, the
    record None where a header name is not UTF-8 (its length and offset delta lead the
    record, so the next one is found all the same)."""
    batch._maybe_uncompress()
    buffer = batch._buffer
    while batch._next_record_index < batch._num_records:
        at = batch._pos
        try:
            record = batch._read_msg()
        except UnicodeDecodeError:
            length, body = decode_varint(buffer, at)
            _, pos = decode_varint(buffer, body)  # attributes
            _, pos = decode_varint(buffer, pos)  # timestamp delta
            delta, _ = decode_varint(buffer, pos)
            batch._pos = body + length
            yield batch.base_offset + delta, None
        else:
            yield record.offset, record
        batch._next_record_index += 1


def _stand_in(tp: Any, offset: int, reason: str = UNREADABLE_REASON
              ) -> ConsumerRecord[Any, Any]:
    """A record with no key or value in place of the one at ``offset``, whose ``reason``
    the stage dead-letters (``stand_in_reason``)."""
    _stand_ins[(tp.topic, tp.partition, offset)] = reason
    while len(_stand_ins) > _STAND_INS_KEPT:
        del _stand_ins[next(iter(_stand_ins))]
    return ConsumerRecord(
        topic=tp.topic, partition=tp.partition, offset=offset,
        timestamp=int(time.time() * 1000), timestamp_type=0, key=None, value=None,
        checksum=None, serialized_key_size=-1, serialized_value_size=-1,
        headers=[(UNREADABLE, reason.encode())])


class SafeSeekConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer without the three ways to commit past unhandled events."""

    dropped_acks = 0  # for tests and metrics: acknowledgements that were not counted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._starts: dict[Any, int] = {}  # where each partition's fetch (re)started
        self._read_offset = _NoReadOffsets()

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return TakingTurnsThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: Any) -> bool:
        acking = self.app.topics.acks_enabled_for(message.topic)
        stale = message.generation_id != self.app.consumer_generation_id
        if acking and (stale or not message.tracked):
            message.acked = True  # settled here: it is fetched again after the seek
            self._unacked_messages.discard(message)
            type(self).dropped_acks += 1
            return False
        return bool(super().ack(message))

    async def _seek_now(self, tp: Any, offset: int) -> None:
        """aiokafka's seek, for ``call_thread``: run in the consumer's thread only."""
        self._thread.seek(tp, offset)

    async def seek_to_committed(self) -> Mapping[Any, int]:
        committed: Mapping[Any, int] = await super().seek_to_committed()
        unsought = [tp for tp, offset in committed.items()
                    if (offset is None or offset <= 0) and not self._is_changelog_tp(tp)]
        beginnings: Mapping[Any, int] = {}
        if unsought:
            try:  # a metadata request: it does not wait on the fetcher's positions
                beginnings = await self._thread.earliest_offsets(*unsought)
            except Exception as exc:  # unknown start: no commit until the next seek
                log.warning("fetch_start_unknown", partitions=len(unsought), error=str(exc))
            for tp in unsought:
                if tp in beginnings:
                    # a position at once: a lazy reset leaves it unset for a while, and
                    # faust's livelock check asserts on an unset position. In the consumer's
                    # own thread: aiokafka's seek drops the partition's fetched records,
                    # and called from this one it raced the fetcher (KeyError in
                    # fetched_records, faust's Fetcher crashed and the worker with it)
                    await self._thread.call_thread(self._seek_now, tp, beginnings[tp])
                else:
                    await self._thread.seek_to_beginning(tp)
        for tp, offset in committed.items():
            start = beginnings.get(tp) if tp in unsought else offset
            if start is not None and not self._is_changelog_tp(tp):
                self._starts[tp] = start
        return committed

    def _filter_committable_offsets(self, tps: Any) -> dict[Any, int]:
        self._take_skipped()
        return dict(super()._filter_committable_offsets(tps))

    def _take_skipped(self) -> None:
        """Move the offsets the fetches found without a record into faust's gaps."""
        while True:
            try:
                tp, first, end = SKIPPED.popleft()
            except IndexError:
                return
            self._gap[tp].addi(first, end)

    def _new_offset(self, tp: Any) -> int | None:
        """The end of the unbroken run, from where ``tp`` must resume, of offsets that were
        acknowledged or hold no record (``_gap``)."""
        acked: list[int] = self._acked[tp]
        gaps = self._gap[tp]  # offsets the broker never returned (markers, compaction)
        if not acked and not gaps:
            return None
        acked.sort()
        committed = self._committed_offset[tp]
        expected = committed if committed is not None else self._starts.get(tp)
        if expected is None:
            return None  # where the run must start is not known yet: commit nothing
        below = 0
        while below < len(acked) and acked[below] < expected:
            below += 1
        if below:  # already committed (a redelivery's second acknowledgement)
            self._acked_index[tp].difference_update(acked[:below])
            del acked[:below]
        end = expected
        while True:  # the message at ``end``, if any, is still being handled where this ends
            if gaps and (holes := gaps.at(end)):
                end = max(hole.end for hole in holes)
            elif acked and acked[0] == end:
                run = next(consecutive_numbers(acked))
                del acked[: len(run)]
                self._acked_index[tp].difference_update(run)
                end = int(run[-1]) + 1
            else:
                break
        if gaps:
            gaps.chop(0, end)
        return end if end > expected else None

    async def on_partitions_assigned(self, assigned: Set[Any], generation_id: int = 0) -> None:
        global _noted_topics
        _noted_topics = _noted_topics.union(
            tp.topic for tp in assigned if self.app.topics.acks_enabled_for(tp.topic))
        stale = 0
        for tp in assigned:
            stale += len(self._acked.pop(tp, ()))
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)
            self._read_offset.pop(tp, None)
            self._committed_offset.pop(tp, None)
            self._starts.pop(tp, None)
        if stale:
            log.info("stale_acks_cleared", offsets=stale, generation=generation_id)
        await super().on_partitions_assigned(assigned, generation_id)


class TakingTurnsThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread, handing out fetched records one partition's turn at a time.

    aiokafka hands out the records it fetched partition by partition, in the order the
    fetches arrived, up to ``max_records`` a call: a partition's whole fetch (1 MB, about
    2,000 requests) goes before the next partition's. In a backlog of requests the
    admitted records waited behind every requests partition's fetch, and generation
    started only once admission had nearly drained the backlog. Here a partition that was
    just served goes behind the others that have records waiting, so each call serves the
    next one in turn: the order within a partition is unchanged.
    """

    async def _fetch_records(self, consumer: Any, active_partitions: Any,
                             timeout: float | None = None,
                             max_records: int | None = None) -> Any:
        records = await super()._fetch_records(consumer, active_partitions, timeout=timeout,
                                                max_records=max_records)
        waiting = consumer._fetcher._records  # an OrderedDict, in the consumer's own thread
        for tp in records:
            if tp in waiting:
                waiting.move_to_end(tp)
        return records


class _NoReadOffsets(dict[Any, "int | None"]):
    """faust's read offsets, kept but never read back: no fetched record is dropped."""

    def __getitem__(self, key: Any) -> int | None:
        return None


def use_safe_seek_consumer(app: Any) -> None:
    """Make ``app`` build its consumer from ``SafeSeekConsumer``, which hands on a record
    aiokafka cannot parse as a stand-in (``_getall``), and decompress record batches within
    ``MAX_BATCH_BYTES`` (a larger one is a stand-in too)."""
    app.transport.Consumer = SafeSeekConsumer
    FetchResult.getall = _getall
    aiokafka_fetcher.MemoryRecords = _KeptMemoryRecords
    for module in (c_default_records, py_default_records):  # (read at each call)
        for name, decode in _DECODERS.items():
            setattr(module, name, decode)
