"""Producer events/s: ``EventProducer.send`` of pydantic events against raw ``produce()``.

Both sides use the same librdkafka config (``PRODUCER_DEFAULTS``: idempotence,
``acks=all``, ``linger.ms=5``, lz4), the same keys, a topic each with the same partitions,
and both count the final ``flush()``. Ours encodes each event, builds its headers and
produces it with a delivery callback; the baseline produces the already-encoded bytes of
the very same events, without headers or callback, serving delivery reports with
``poll(0)`` every 1000 messages (or when the local queue is full). A third side, the
baseline plus the same two headers, shows how much of the gap headers alone cost.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from aipipe.producers.producer import PRODUCER_DEFAULTS, EventProducer, headers_for
from aipipe.schemas.events import OperationRequested, encode
from tests.bench.report import Figure, Sample, Stopwatch, best_of, compare


class RawSide:
    """Raw ``produce()`` of pre-encoded bytes; with ``headers``, the same headers as ours."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        payloads: list[tuple[bytes, bytes]],
        headers: list[Any] | None = None,  # one header list per payload
    ) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS})
        self.topic = topic
        self.payloads = payloads
        self.headers = headers

    def send_all(self, count: int) -> None:
        produce, poll, topic = self.producer.produce, self.producer.poll, self.topic
        headers = self.headers
        for n, (key, value) in enumerate(self.payloads[:count]):
            while True:
                try:
                    if headers is None:
                        produce(topic, value, key)
                    else:
                        produce(topic, value, key, headers=headers[n])
                    break
                except BufferError:  # the local queue is full: serve deliveries, retry
                    poll(0.05)
            if n % 1000 == 0:
                poll(0)
        if self.producer.flush(60):
            raise RuntimeError("raw producer: messages left unacknowledged after 60 s")

    def measure(self, _round: int) -> Sample:
        with Stopwatch() as sw:
            self.send_all(len(self.payloads))
        return sw.sample(len(self.payloads))


class OurSide:
    def __init__(self, bootstrap: str, topic: str, events: list[OperationRequested]) -> None:
        self.producer = EventProducer(bootstrap)
        self.topic = topic
        self.events = events

    def send_all(self, count: int) -> None:
        send, topic = self.producer.send, self.topic
        for event in self.events[:count]:
            send(topic, event)
        self.producer.flush(60)

    def measure(self, _round: int) -> Sample:
        with Stopwatch() as sw:
            self.send_all(len(self.events))
        return sw.sample(len(self.events))


def bench_producer(
    bootstrap: str,
    topics: tuple[str, str, str],
    events: list[OperationRequested],
    rounds: int,
    say: Callable[[str], None],
) -> list[Figure]:
    """Ours against raw ``produce()``; and, for where the time goes, raw with our headers."""
    payloads = [(e.client_id.encode(), encode(e)) for e in events]
    sides: dict[str, OurSide | RawSide] = {
        "ours": OurSide(bootstrap, topics[0], events),
        "baseline": RawSide(bootstrap, topics[1], payloads),
        "raw+headers": RawSide(bootstrap, topics[2], payloads, [headers_for(e) for e in events]),
    }
    say(f"  warm-up: one full pass of {len(events):,} events each side (broker JIT, lz4, ids)")
    for side in sides.values():
        side.send_all(len(events))
    samples = best_of(rounds, {name: side.measure for name, side in sides.items()}, say,
                      "events/s")
    ours = sides["ours"]
    assert isinstance(ours, OurSide)
    if ours.producer.delivered != (rounds + 1) * len(events):
        raise RuntimeError(f"ours delivered {ours.producer.delivered:,} events, "
                           f"expected {(rounds + 1) * len(events):,}")
    method = f"best of {rounds}, rotating order, after a full warm-up pass"
    notes = {
        "events_per_round": len(events),
        "mean_event_bytes": round(sum(len(v) for _, v in payloads) / len(payloads), 1),
        "config": PRODUCER_DEFAULTS,
        "ours": "EventProducer.send (encode + headers + produce + poll(0)), then flush",
        "baseline": "Producer.produce(topic, pre-encoded value, key), poll(0) per 1000, flush",
        "raw+headers": "the baseline plus the same two headers per message as ours",
    }
    return [
        compare("Producer events/s", "ev/s", 0.5, method,
                samples["ours"], samples["baseline"], notes),
        compare("Producer vs raw+same headers", "ev/s", None, method,
                samples["ours"], samples["raw+headers"], notes),
    ]


def profile_ours(
    bootstrap: str, topic: str, events: list[OperationRequested], top: int = 18
) -> str:
    """cProfile of our send loop (plus flush), the top entries by own time."""
    side = OurSide(bootstrap, topic, events)
    profiler = cProfile.Profile()
    profiler.enable()
    side.send_all(len(events))
    profiler.disable()
    out = io.StringIO()
    stats: Any = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()
