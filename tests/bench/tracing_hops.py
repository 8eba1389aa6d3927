"""The tracing calls a worker makes for one request across its hops, timed alone.

What a traced worker does per request beside its real work, without Kafka, the provider
or the store, so that a change to ``aipipe.producers.tracing`` can be measured in
microseconds where the end-to-end bench (``tests.bench.observability``) moves ±15 % a
round:

- admission: the stage's span (``start_consumer`` on the request's headers), the
  decision's headers, the span ended;
- generation: its span current for the operation (``spans.generation``), a
  ``provider_call`` span, two log lines' trace ids, the headers of the started and the
  completed event, the completion's attributes (``note``);
- the cost sink: its span on the completion's headers, ended.

Each request comes with the ``traceparent`` of an emitter's send span sampled by
``parentbased_traceidratio`` at the ratio; ended spans go to the workers' own span
processor (``HandOff``), whose helper here discards what it is handed. The baseline is
the same calls with tracing off. Figures are CPU µs per request of this process (the
hand-off's thread included), best of ``--rounds``.

Run: ``python -m tests.bench.tracing_hops [--count N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from aipipe.infra.span_export import HandOff
from aipipe.producers import tracing
from aipipe.producers.producer import _producer_span, headers_for
from aipipe.streams import spans
from aipipe.streams.admission.decide import admitted
from tests.bench.workloads import completed_events
from tests.support.ledger import image_requests

# the helper the hand-off starts: it reads and drops the spans (``HandOff`` adds the
# exporters' names and its answers' descriptor as arguments, which ``sh`` ignores)
DISCARD = ["sh", "-c", "exec cat > /dev/null", "discard"]


def requests_with_context(count: int, ratio: float) -> list[tuple[Any, ...]]:
    """Per request: the request, its admission, its completion, and the request's headers
    as an emitter's send span (sampled at ``ratio``) left them."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    tracing.enabled, tracing._tracer = True, provider.get_tracer("emitter")
    try:
        out = []
        for request, completed in zip(image_requests(count, 50, prefix="hop-"),
                                      completed_events(count), strict=True):
            decision = admitted(request, request.occurred_at, backend="redis")
            headers: list[Any] = []
            _producer_span("requested", request, headers).end()
            out.append((request, decision, completed,
                        [(name, value.encode()) for name, value in headers]))
        return out
    finally:
        tracing.disable()


def hops(request: Any, decision: Any, completed: Any, headers: list[Any]) -> None:
    """One request's tracing calls in the order a worker makes them."""
    span = tracing.start_consumer("admission", headers, request) if tracing.enabled else None
    decided = headers_for(decision, span)
    if span is not None:
        span.end()
    with spans.generation(_Message(decided), decision):
        with spans.provider_call("simulated", decision.model, 1):
            pass
        for _ in range(2):  # the log lines' ids
            if tracing.enabled:
                tracing.current_ids()
        headers_for(decision)
        out = headers_for(completed)
        if tracing.enabled:
            tracing.note(completed)
    if tracing.enabled:
        tracing.start_consumer("sink costs", out, completed, **{
            "messaging.system": "kafka", "messaging.destination.name": "completed",
            "messaging.kafka.partition": 0, "messaging.kafka.offset": 0}).end()


class _Message:
    __slots__ = ("headers",)

    def __init__(self, headers: list[Any]) -> None:
        self.headers = headers


def per_request(prepared: list[tuple[Any, ...]], rounds: int) -> float:
    """Best of ``rounds``: CPU µs of this process per request."""
    best = float("inf")
    for _ in range(rounds):
        began = time.process_time()
        for item in prepared:
            hops(*item)
        best = min(best, (time.process_time() - began) / len(prepared) * 1e6)
    return best


def bench(count: int, rounds: int, ratios: tuple[float, ...],
          say: Callable[[str], None]) -> dict[str, float]:
    out = {"off": per_request(requests_with_context(count, 0.0), rounds)}
    say(f"off: {out['off']:.1f} us CPU per request")
    for ratio in ratios:
        prepared = requests_with_context(count, ratio)
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        handoff = HandOff(Resource.create(), "none", DISCARD)
        provider.add_span_processor(handoff)
        tracing.enable(follows_parent=True)
        tracing._tracer = provider.get_tracer("aipipe")
        try:
            per_request(prepared[: max(count // 10, 1)], 1)  # warm-up
            out[f"{ratio:g}"] = per_request(prepared, rounds)
        finally:
            tracing.disable()
            handoff.shutdown()
        say(f"sampled {ratio:g}: {out[f'{ratio:g}']:.1f} us CPU per request, "
            f"{out[f'{ratio:g}'] - out['off']:.1f} us more than off")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracing_hops")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    args = parser.parse_args(argv)
    bench(args.count, args.rounds, tuple(args.ratios), print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
