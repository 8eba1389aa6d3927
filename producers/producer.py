"""The producer upstream services use: idempotent, keyed by client, delivery failures raised.

confluent-kafka does not enable idempotence by default; this sets it with ``acks=all``.
Each event is keyed by ``client_id`` (one client's events stay ordered on one partition)
and carries ``request_id`` and ``event_type`` as headers.

``send`` is the hot path (``make bench`` holds it against raw ``produce()`` of the same
bytes and headers): one Python frame per event, the event's JSON from ``encode`` (orjson
for most types), the ``event_type`` header built once per type, and the key and header
values handed over as ``str``, which the client writes as UTF-8 without a Python-side
``encode()``. ``produce()`` gets its arguments by position (partition -1: the
partitioner's choice, by key; callbacks None: the producer's own; timestamp 0: now): its
keyword parsing costs about 0.5 µs a call, a seventh of the call.

With tracing on (``aipipe.producers.tracing``) ``send`` starts a producer span per event,
the child of the current span or a new trace, and adds its W3C ``traceparent`` (and
``tracestate``) to the headers; ``headers_for`` adds the span's it is given, or the current
span's. With tracing off both cost one check of a module flag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from aipipe.producers import tracing
from aipipe.schemas.deadletter import Headers
from aipipe.schemas.errors import AipipeError
from aipipe.schemas.events import EVENT_TYPES, Event, encode

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
}


class DeliveryError(AipipeError):
    """Kafka did not acknowledge one or more produced events."""

    def __init__(self, message: str, failures: list[tuple[str, KafkaError]]) -> None:
        super().__init__(message)
        self.failures = failures


# the ``event_type`` header of each event type, built once
_TYPE_HEADERS: dict[type[Event], tuple[str, bytes]] = {
    cls: ("event_type", name.encode()) for name, cls in EVENT_TYPES.items()
}
POLL_EVERY = 1000  # sends between two polls for delivery reports
#: where the confluent-kafka clients' own log lines go (their ``logger`` setting), served by
#: their poll() and flush(): Python logging, not librdkafka's lines on stderr
LIBRDKAFKA_LOGGER = logging.getLogger("aipipe.librdkafka")


def headers_for(event: Event, span: Any = None) -> Headers:
    """The headers ``send`` sets, as bytes (for other clients: faust, the bench's baseline),
    with the trace context of ``span`` (or the current span) when tracing is on."""
    headers: Headers = [
        ("request_id", event.request_id.encode()),
        _TYPE_HEADERS.get(type(event)) or _type_header(event),
    ]
    if tracing.enabled:
        tracing.inject(headers, span=span)
    return headers


def _type_header(event: Event) -> tuple[str, bytes]:
    """The header of an event type outside ``EVENT_TYPES`` (a subclass, a test's own)."""
    event_type: str = getattr(event, "event_type", "")
    return ("event_type", event_type.encode())


def _producer_span(topic: str, event: Event, headers: Headers) -> Any:
    """The span of one send (the current span's child, or a new trace), its context added
    to ``headers``."""
    from opentelemetry.trace import SpanKind  # deferred: OpenTelemetry only when tracing is on

    span = tracing.tracer().start_span(
        f"send {topic}", context=tracing.current_context(), kind=SpanKind.PRODUCER,
        attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                    "messaging.operation.type": "send", **tracing.attributes(event)})
    tracing.inject(headers, as_bytes=False, span=span)
    return span


class EventProducer:
    """Send events to a topic; ``flush()`` raises ``DeliveryError`` for any that failed."""

    def __init__(self, bootstrap: str, **config: Any) -> None:
        # One callback for the whole producer, called for failed deliveries only: a
        # Python callback per message would cost more than the produce call itself.
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                **PRODUCER_DEFAULTS,
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
                "logger": LIBRDKAFKA_LOGGER,
                **config,
            }
        )
        self._produce = self._producer.produce
        tracing.detect()  # a tracer provider set by this process's own OpenTelemetry SDK
        self._failures: list[tuple[str, KafkaError]] = []
        self.sent = 0
        self.failed = 0

    @property
    def delivered(self) -> int:
        """Events Kafka acknowledged so far (exact after ``flush``)."""
        return self.sent - self.failed - len(self._producer)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            key = msg.key()
            self.failed += 1
            self._failures.append((key.decode() if key else "", err))

    def send(self, topic: str, event: Event) -> None:
        """Queue ``event``; ``flush()`` raises for any that Kafka did not acknowledge."""
        # send_raw's body, inlined: a second Python frame per event shows in the bench
        value = encode(event)
        headers: Headers = [
            ("request_id", event.request_id),
            _TYPE_HEADERS.get(type(event)) or _type_header(event),
        ]
        span = _producer_span(topic, event, headers) if tracing.enabled else None
        try:
            self._produce(topic, value, event.client_id, -1, None, None, 0, headers)
        except BufferError:
            self._produce_when_room(topic, event.client_id, value, headers)
        except KafkaException as exc:
            raise DeliveryError(f"Kafka refused the event for {topic}: {exc}.", []) from exc
        finally:
            if span is not None:
                span.end()
        self.sent += 1
        if not self.sent % POLL_EVERY:
            self._producer.poll(0)  # serve delivery reports now and then, not on every send

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers | None = None,
    ) -> None:
        """Send pre-encoded bytes (for tools that forward or replay events)."""
        self._produce_when_room(topic, key, value, headers)
        self.sent += 1
        if not self.sent % POLL_EVERY:
            self._producer.poll(0)  # serve delivery reports now and then, not on every send

    def _produce_when_room(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes,
        headers: Headers | None,
    ) -> None:
        while True:
            try:
                self._produce(topic, value, key, -1, None, None, 0, headers)
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: serve deliveries, retry
            except KafkaException as exc:
                raise DeliveryError(f"Kafka refused the event for {topic}: {exc}.", []) from exc

    def send_many(self, topic: str, events: Iterable[Event]) -> None:
        for event in events:
            self.send(topic, event)

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryError(
                f"{remaining} events were not acknowledged within {timeout:.0f}s; "
                "check that Kafka at the bootstrap address is reachable.",
                [],
            )
        if self._failures:
            failures, self._failures = self._failures, []
            first = failures[0][1]
            raise DeliveryError(
                f"{len(failures)} events failed delivery (first: {first.str()}).", failures
            )

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
