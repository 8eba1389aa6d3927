"""One trace per request across real processes, exported over OTLP/HTTP by every stage.

``aipipe emit`` (the producer), a streams worker (admission, generation, provider calls,
video polls) and a costs worker (the cost sink) run as separate processes with the
standard ``OTEL_*`` variables pointing at a small OTLP/HTTP receiver in the test
(``tests.support.otlp``), which decodes each protobuf ``ExportTraceServiceRequest``.
Every request's spans share one trace id, each stage's span is the child of the previous
hop's (through the ``traceparent`` header), the ids, model and cost are attributes (the
cost equal to the row in ClickHouse), and the workers' log lines logged within a span carry
its ids. A request whose upstream trace was not sampled records no span anywhere, and its
trace id still reaches the completion's headers and its log line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal

import pytest
from confluent_kafka import Consumer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers.producer import EventProducer, headers_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested, encode
from tests.support.otlp import OtlpReceiver, Span
from tests.support.pipeline import store_of, wait_recorded

pytestmark = pytest.mark.e2e

IMAGES, VIDEOS = 3, 1
POLLS = 2  # the simulated video is done at its second poll
UNSAMPLED = "unsampled-1"  # a request sent within an upstream trace that was not sampled
UNSAMPLED_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """The receiver, and the OTEL_* variables every process started here inherits."""
    with OtlpReceiver() as server:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 0.2 s, not 5 s
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        yield server


def emit(settings: Settings, *args: str) -> list[str]:
    """``aipipe emit`` in its own process; the event ids it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env.update(settings.to_env())
    done = subprocess.run([sys.executable, "-m", "aipipe", "emit", "--client", "acme",
                           "--param", "prompt=a lamp", *args],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def send_unsampled(settings: Settings) -> None:
    """A request whose ``traceparent`` says its upstream trace was not sampled (flags 00)."""
    request = OperationRequested(request_id=UNSAMPLED, client_id="acme",
                                 operation_type="image_generation",
                                 model="gemini-2.5-flash-image", params={"prompt": "a lamp"})
    parent = f"00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00".encode()
    with EventProducer(settings.kafka_bootstrap) as producer:
        producer.send_raw(settings.topics.requested, b"acme", encode(request),
                          [*headers_for(request), ("traceparent", parent)])


def completion_headers(settings: Settings, request_id: str) -> dict[str, bytes]:
    """The headers of ``request_id``'s completion on the completed topic."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"{settings.topic_prefix}-headers",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topics.completed])
    found: dict[str, bytes] = {}

    def read() -> bool:
        for message in consumer.consume(num_messages=100, timeout=0.5):
            if message.error() is None and json.loads(
                    message.value() or b"{}")["request_id"] == request_id:
                found.update((k, bytes(v)) for k, v in message.headers() or [])
        return bool(found)

    try:
        wait_for(read, 60, f"{request_id}'s completion", interval=0)
    finally:
        consumer.close()
    return found


def one(spans: list[Span], name: str) -> Span:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_one_trace_per_request_from_emit_to_cost_row(
    settings: Settings, receiver: OtlpReceiver
) -> None:
    settings = settings.model_copy(update={
        "simulated_video_polls": POLLS, "video_poll_base_seconds": 0.2})
    prepare_topics(settings)
    workers = [WorkerProcess(settings, role).start() for role in ("costs", "streams")]
    try:
        emitted = emit(settings, "--type", "image_generation", "--model",
                       "gemini-2.5-flash-image", "--count", str(IMAGES))
        emitted += emit(settings, "--type", "video_generation", "--model",
                        "veo-3.0-fast-generate-001", "--param", "duration_seconds=4")
        assert len(emitted) == IMAGES + VIDEOS
        send_unsampled(settings)
        costs = workers[0]
        store = store_of(settings, costs)
        wait_recorded(store, IMAGES + VIDEOS + 1, timeout=120, worker=costs)
        rows = store.client.query(
            f"SELECT request_id, operation_type, model, cost_usd FROM {store.table} FINAL"
            " WHERE request_id != %(u)s", parameters={"u": UNSAMPLED}).result_rows
        assert len(rows) == IMAGES + VIDEOS
        # the unsampled request's context went through every hop unchanged
        assert completion_headers(settings, UNSAMPLED)["traceparent"] == (
            f"00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00".encode())

        def complete() -> bool:
            sinks = [s for s in receiver.spans if s.name == "sink costs"]
            return len(sinks) == IMAGES + VIDEOS and all(
                any(s.name == "sink costs" for s in spans)
                for spans in receiver.traces().values())

        wait_for(complete, 60, "a cost sink span in every trace")
    finally:
        for worker in reversed(workers):
            worker.stop()

    traces = receiver.traces()
    assert len(traces) == IMAGES + VIDEOS  # one trace per request, nothing else
    assert UNSAMPLED_TRACE not in traces  # nothing recorded of the unsampled request
    by_request = {one(spans, "sink costs").attributes["aipipe.request_id"]: spans
                  for spans in traces.values()}
    assert set(by_request) == {row[0] for row in rows}
    for request_id, operation_type, model, cost in rows:
        spans = by_request[request_id]
        send = one(spans, f"send {settings.topics.requested}")
        admission = one(spans, "admission")
        generation = one(spans, "generation")
        sink = one(spans, "sink costs")
        # each hop's span is the child of the one before it
        assert (send.service, send.parent_id) == ("aipipe-emit", "")
        assert (admission.service, admission.parent_id) == ("aipipe-streams", send.span_id)
        assert generation.parent_id == admission.span_id
        assert sink.service == "aipipe-costs"
        calls = [s for s in spans if s.name == "provider_call"]
        if operation_type == "video_generation":
            polls = sorted((s for s in spans if s.name == "video_poll"), key=lambda s: s.start)
            assert [p.attributes["aipipe.poll_attempt"] for p in polls] == [1, 2]
            assert [p.parent_id for p in polls] == [generation.span_id, polls[0].span_id]
            assert sink.parent_id == polls[-1].span_id
            assert sorted(c.parent_id for c in calls) == sorted(
                [generation.span_id, *(p.span_id for p in polls)])
            finished = polls[-1]
        else:
            assert sink.parent_id == generation.span_id
            assert [c.parent_id for c in calls] == [generation.span_id]
            finished = generation
        for span in (send, admission, generation, sink):
            assert span.attributes["aipipe.request_id"] == request_id
            assert span.attributes["aipipe.client_id"] == "acme"
            assert span.attributes["aipipe.model"] == model
        assert admission.attributes["aipipe.decision"] == "admitted"
        assert [c.attributes["aipipe.model"] for c in calls] == [model] * len(calls)
        # the completion's cost on the span that completed it and on the sink's
        for span in (finished, sink):
            assert Decimal(str(span.attributes["aipipe.cost_usd"])) == Decimal(cost)
            assert span.attributes["aipipe.success"] is True

    # a log line written within a span carries its trace and span id
    logged = [json.loads(line) for line in workers[1].log_path.read_text().splitlines()
              if line.startswith("{") and '"ai_operation"' in line]
    [unsampled] = [line for line in logged if line["request_id"] == UNSAMPLED]
    assert unsampled["trace_id"] == UNSAMPLED_TRACE  # a log search by trace id finds it
    logged.remove(unsampled)
    assert len(logged) == IMAGES + VIDEOS
    spans_by_id = {s.span_id: s for spans in traces.values() for s in spans}
    for line in logged:
        span = spans_by_id[line["span_id"]]
        assert span.trace_id == line["trace_id"]
        assert span.attributes["aipipe.request_id"] == line["request_id"]
