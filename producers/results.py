"""The emitter gets its result back: ``submit()`` resolves with the operation's outcome.

``ResultClient`` sends an ``operation.requested`` and resolves with what became of it: the
``operation.completed`` (with its ``outputs``) or the ``operation.rejected`` that admission
decided. It reads the completed and rejected topics from where they ended when the client
started (their high watermarks, taken before anything is sent, so no outcome of a request
sent through the client can be missed), never any history, and decodes only the records
whose ``request_id`` header belongs to a pending request. No consumer group offsets are
committed: each client is a reader of its own.

One reader thread serves every pending request of a client; if it dies, every pending
request fails with the reason rather than waiting for its timeout::

    with ResultClient(bootstrap, Topics(prefix)) as results:
        outcome = await results.submit(request, timeout=300)       # asyncio
        outcome = results.submit_blocking(request, timeout=300)    # threads

``find_outcome`` looks up one operation or request from the beginning of the topics (for
``aipipe result``), and can go on waiting for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from aipipe.producers.messages import readable
from aipipe.producers.producer import LIBRDKAFKA_LOGGER, EventProducer
from aipipe.schemas.errors import AipipeError, EventDecodeError
from aipipe.schemas.events import OperationCompleted, OperationRejected, OperationRequested, decode
from aipipe.schemas.topics import Topics

Outcome = OperationCompleted | OperationRejected
_ELECTING = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
             KafkaError.UNKNOWN_TOPIC_OR_PART}


class ResultError(AipipeError):
    """The outcome of a request could not be read (the reader failed, or Kafka did)."""


class ResultTimeout(ResultError, TimeoutError):
    """No outcome arrived within the timeout; the request may still complete later."""


def _reader(bootstrap: str, config: dict[str, Any]) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"aipipe-results-{uuid.uuid4()}",  # never committed: offsets are ours
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "logger": LIBRDKAFKA_LOGGER,
        **config,
    })


def _assign(consumer: Consumer, topics: list[str], from_end: bool, timeout: float) -> None:
    """Assign every partition of ``topics`` at their high (or low) watermark."""
    assignment: list[TopicPartition] = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ResultError(f"Topic {topic} does not exist; start the pipeline "
                              "(aipipe up, aipipe run) or check AIPIPE_TOPIC_PREFIX.")
        for partition in sorted(meta.partitions):
            low, high = _watermarks(consumer, TopicPartition(topic, partition), timeout)
            assignment.append(TopicPartition(topic, partition, high if from_end else low))
    consumer.assign(assignment)


def _watermarks(consumer: Consumer, tp: TopicPartition, timeout: float) -> tuple[int, int]:
    """The partition's low and high watermarks; a leader being elected (a topic just
    created, a broker restarting) is waited for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not getattr(error, "retriable", lambda: False)() and getattr(
                    error, "code", lambda: None)() not in _ELECTING:
                raise ResultError(f"Kafka did not give the offsets of {tp.topic} "
                                  f"[{tp.partition}]: {exc}") from exc
            if time.monotonic() + delay > deadline:
                raise ResultError(f"Kafka did not give the offsets of {tp.topic} "
                                  f"[{tp.partition}] within {timeout:g}s: {exc}") from exc
            time.sleep(delay)  # a leader election, not a hot path
            delay = min(delay * 2, 1.0)


def _request_id(headers: Any) -> str | None:
    for name, value in headers or ():
        if name == "request_id" and isinstance(value, bytes):
            return value.decode(errors="replace")
    return None


def _outcome(value: bytes | None) -> Outcome | None:
    try:
        event = decode(value)
    except EventDecodeError:
        return None
    return event if isinstance(event, OperationCompleted | OperationRejected) else None


class ResultClient:
    """Submit requests and await their outcomes; see the module docstring."""

    def __init__(self, bootstrap: str, topics: Topics, producer: EventProducer | None = None,
                 metadata_timeout: float = 10.0, auth: dict[str, Any] | None = None,
                 **config: Any) -> None:
        """``auth`` signs both clients in (SASL settings); ``config`` is the reader's."""
        self.topics = topics
        self._producer = producer or EventProducer(bootstrap, **(auth or {}))
        self._own_producer = producer is None
        self._consumer = _reader(bootstrap, {**(auth or {}), **config})
        # by (client_id, event_id): an event_id is unique only within its client
        self._pending: dict[tuple[str, str], concurrent.futures.Future[Outcome]] = {}
        self._requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        _assign(self._consumer, [topics.completed, topics.rejected], from_end=True,
                timeout=metadata_timeout)
        self._thread = threading.Thread(target=self._read, name="aipipe-results", daemon=True)
        self._thread.start()

    # -- waiting -----------------------------------------------------------------------

    def expect(self, request: OperationRequested) -> concurrent.futures.Future[Outcome]:
        """A future for ``request``'s outcome; register it before sending the request."""
        with self._lock:
            if self._failure is not None:
                raise ResultError(f"The result reader failed: {self._failure}") from None
            key = (request.client_id, request.event_id)
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = concurrent.futures.Future()
                self._requests[request.request_id] += 1
            return future

    def _forget(self, request: OperationRequested) -> None:
        with self._lock:
            if self._pending.pop((request.client_id, request.event_id), None) is not None:
                self._requests[request.request_id] -= 1
                if self._requests[request.request_id] <= 0:
                    del self._requests[request.request_id]

    def _send(self, request: OperationRequested) -> None:
        self._producer.send(self.topics.requested, request)
        self._producer.flush()

    async def submit(self, request: OperationRequested, timeout: float = 300.0) -> Outcome:
        """Send ``request`` and resolve with its completion or rejection."""
        future = self.expect(request)
        try:
            await asyncio.to_thread(self._send, request)
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            raise ResultTimeout(
                f"No outcome for operation {request.event_id} within {timeout:g}s; it may "
                f"still complete: aipipe result {request.event_id} --client "
                f"{request.client_id} --wait."
            ) from None
        finally:
            self._forget(request)

    def submit_blocking(self, request: OperationRequested, timeout: float = 300.0) -> Outcome:
        """``submit`` for code without an event loop."""
        future = self.expect(request)
        try:
            self._send(request)
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise ResultTimeout(
                f"No outcome for operation {request.event_id} within {timeout:g}s; it may "
                f"still complete: aipipe result {request.event_id} --client "
                f"{request.client_id} --wait."
            ) from None
        finally:
            self._forget(request)

    # -- reading -----------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                for message in self._consumer.consume(500, 0.2):
                    error = message.error()
                    if error is not None:
                        if error.fatal():
                            raise KafkaException(error)
                        continue
                    # (another record's header name that is not UTF-8 reads as none)
                    message = readable(message)
                    with self._lock:
                        wanted = _request_id(message.headers()) in self._requests
                    if not wanted:
                        continue
                    outcome = _outcome(message.value())
                    if outcome is None:
                        continue
                    with self._lock:
                        future = self._pending.get((outcome.client_id, outcome.operation_id))
                    if future is not None and not future.done():
                        future.set_result(outcome)
        except BaseException as exc:  # the reader is gone: no pending request waits in vain
            with self._lock:
                self._failure = exc
                pending = list(self._pending.values())
            for future in pending:
                if not future.done():
                    future.set_exception(ResultError(f"The result reader failed: {exc}"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()
        if self._own_producer:
            self._producer.close()

    def __enter__(self) -> ResultClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_outcome(bootstrap: str, topics: Topics, wanted: str, wait: float = 0.0,
                 metadata_timeout: float = 10.0, client: str | None = None,
                 **config: Any) -> Outcome | None:
    """The outcome whose ``operation_id`` or ``request_id`` is ``wanted`` (of ``client``
    only, when given: ids are unique within a client), read from the beginning of the
    topics; waits up to ``wait`` seconds for it to arrive, else ``None``. A completion is
    preferred to a rejection."""
    consumer = _reader(bootstrap, config)
    try:
        _assign(consumer, [topics.completed, topics.rejected], from_end=False,
                timeout=metadata_timeout)
        behind: dict[tuple[str, int], int] = {}  # partitions not yet read to their end
        for tp in consumer.assignment():
            low, high = _watermarks(consumer, tp, metadata_timeout)
            if high > low:
                behind[(str(tp.topic), int(tp.partition))] = high
        found: Outcome | None = None
        deadline = time.monotonic() + wait
        while True:
            for message in consumer.consume(500, 0.2):
                if message.error() is not None:
                    continue
                key = (str(message.topic()), int(message.partition() or 0))
                if key in behind and int(message.offset() or 0) + 1 >= behind[key]:
                    del behind[key]
                outcome = _outcome(message.value())
                if outcome is None or wanted not in (outcome.operation_id, outcome.request_id) \
                        or client not in (None, outcome.client_id):
                    continue
                if isinstance(outcome, OperationCompleted):
                    return outcome
                found = found or outcome
            if not behind and (found is not None or time.monotonic() >= deadline):
                return found
    finally:
        consumer.close()
