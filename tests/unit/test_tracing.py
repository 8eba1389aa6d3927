"""Trace context in Kafka headers, the spans' parents and attributes, and ids in log lines.

Spans are recorded by the SDK's in-memory exporter through a tracer handed to
``aipipe.producers.tracing`` (the global tracer provider stays unset in the test process).
The workers' export path (``aipipe.infra.span_export``) runs its real helper process with
the console exporter, whose output the tests read.
"""

from __future__ import annotations

import json
import marshal
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, StatusCode

from aipipe.infra.logging import add_trace_ids
from aipipe.infra.metrics import SPANS_DROPPED
from aipipe.infra.settings import ConfigError, load_settings
from aipipe.infra.span_export import HandOff, compact, rebuilt
from aipipe.processes import wait_for
from aipipe.producers import tracing
from aipipe.producers.producer import _producer_span, headers_for
from aipipe.schemas.events import OperationRequested
from aipipe.span_helper import hand_off
from aipipe.streams import spans as stage_spans

OTEL = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME")


def request() -> OperationRequested:
    return OperationRequested(request_id="req-1", client_id="acme",
                              operation_type="image_generation",
                              model="gemini-2.5-flash-image", params={"prompt": "a lamp"})


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enabled, tracing._tracer = True, provider.get_tracer("test")
    try:
        yield exporter
    finally:
        tracing.disable()


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
])
def test_tracing_is_on_when_the_otel_variables_ask_for_traces(
    env: dict[str, str], on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in OTEL:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.tracing is on
    assert {k: v for k, v in settings.to_env().items() if k.startswith("OTEL_")} == {
        k: v for k, v in env.items() if k != "OTEL_SDK_DISABLED"} | (
        {"OTEL_SDK_DISABLED": "true"} if "OTEL_SDK_DISABLED" in env else {})


def test_an_unknown_exporter_is_one_sentence_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ConfigError, match=r"^OTEL_TRACES_EXPORTER is invalid .*'jaeger' is not "
                                          r"an exporter here; use otlp, console or none"):
        load_settings()


def test_off_the_headers_carry_no_trace_context() -> None:
    assert not tracing.enabled
    assert [name for name, _ in headers_for(request())] == ["request_id", "event_type"]


def test_a_send_starts_a_trace_and_puts_its_span_in_the_headers(
    spans: InMemorySpanExporter,
) -> None:
    headers: list[Any] = [("request_id", "req-1")]
    _producer_span("requested", request(), headers).end()
    [sent] = spans.get_finished_spans()
    assert sent.parent is None and sent.kind is SpanKind.PRODUCER
    assert sent.name == "send requested"
    context = sent.get_span_context()
    assert headers[1] == ("traceparent", f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                                         f"{int(context.trace_flags):02x}")
    assert sent.attributes is not None
    assert {k: sent.attributes[k] for k in ("aipipe.request_id", "aipipe.client_id",
                                            "aipipe.model")} == {
        "aipipe.request_id": "req-1", "aipipe.client_id": "acme",
        "aipipe.model": "gemini-2.5-flash-image"}


def test_a_send_within_a_span_continues_its_trace(spans: InMemorySpanExporter) -> None:
    outer = tracing.tracer().start_span("upstream handler")
    with tracing.within(outer, end=True):
        _producer_span("requested", request(), []).end()
    sent, handler = spans.get_finished_spans()
    assert sent.parent is not None
    assert sent.parent.span_id == handler.get_span_context().span_id
    assert sent.get_span_context().trace_id == handler.get_span_context().trace_id


def test_each_hop_is_the_child_of_the_span_in_the_headers_it_consumed(
    spans: InMemorySpanExporter,
) -> None:
    event = request()
    produced: list[Any] = []
    _producer_span("requested", event, produced).end()
    as_kafka = [(name, value.encode()) for name, value in produced]  # what a consumer reads
    stage = tracing.start_consumer("admission", as_kafka, event)
    emitted = headers_for(event, stage)  # the next hop's headers
    stage.end()
    following = tracing.start_consumer("generation", dict(tracing.carried(emitted)), event)
    following.end()
    sent, admission, generation = spans.get_finished_spans()
    assert admission.kind is SpanKind.CONSUMER
    assert admission.parent is not None and generation.parent is not None
    assert admission.parent.span_id == sent.get_span_context().span_id
    assert generation.parent.span_id == admission.get_span_context().span_id
    assert len({s.get_span_context().trace_id for s in (sent, admission, generation)}) == 1


def test_tracestate_travels_with_the_traceparent(spans: InMemorySpanExporter) -> None:
    parent = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
              ("tracestate", b"vendor=opaque")]
    stage = tracing.start_consumer("admission", parent, request())
    assert headers_for(request(), stage)[2:] == [
        ("traceparent", f"00-0af7651916cd43dd8448eb211c80319c-"
                        f"{stage.get_span_context().span_id:016x}-01".encode()),
        ("tracestate", b"vendor=opaque")]
    stage.end()


def test_a_log_line_within_a_span_carries_its_ids(spans: InMemorySpanExporter) -> None:
    assert add_trace_ids(None, "info", {"event": "outside"}) == {"event": "outside"}
    span = tracing.tracer().start_span("generation")
    with tracing.within(span, end=True):
        line = add_trace_ids(None, "info", {"event": "ai_operation"})
    context = span.get_span_context()
    assert line == {"event": "ai_operation", "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}"}


UNSAMPLED = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]
SAMPLED = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]


@pytest.fixture
def parent_based(spans: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """As the workers set the SDK up: the default sampler follows a remote parent."""
    tracing._follows_parent = True
    yield spans


def test_an_unsampled_input_passes_its_context_on_and_records_nothing(
    parent_based: InMemorySpanExporter,
) -> None:
    stage = tracing.start_consumer("generation", UNSAMPLED, request())
    assert not stage.is_recording()
    assert headers_for(request(), stage)[2:] == [("traceparent", UNSAMPLED[0][1])]
    with tracing.within(stage, end=True):
        assert not tracing.recording()
        with stage_spans.provider_call("gemini", "gemini-2.5-flash-image", 1) as call:
            assert call is None  # no span built for the sampler to drop
    assert parent_based.get_finished_spans() == ()


def test_a_send_within_an_unsampled_parent_passed_on_continues_its_trace_unrecorded(
    parent_based: InMemorySpanExporter,
) -> None:
    stage = tracing.start_consumer("generation", UNSAMPLED, request())
    headers: list[Any] = []
    with tracing.within(stage, end=True):
        send = _producer_span("aipipe.completed", request(), headers)
        send.end()
    assert not send.is_recording()
    context = send.get_span_context()  # the sampler's unrecorded child, in the parent's trace
    assert context.trace_id == int(UNSAMPLED[0][1].decode().split("-")[1], 16)
    assert headers == [("traceparent", f"00-{context.trace_id:032x}-{context.span_id:016x}-00")]
    assert parent_based.get_finished_spans() == ()


def test_a_recorded_span_within_an_unsampled_parent_is_the_current_one_until_it_ends(
    parent_based: InMemorySpanExporter,
) -> None:
    passed = tracing.start_consumer("generation", UNSAMPLED, request())
    polled = tracing.start_consumer("video_poll", SAMPLED, request())
    with tracing.within(passed):
        with tracing.within(polled, end=True):
            assert tracing.recording()
            assert tracing.current_span() is polled
            context = polled.get_span_context()
            assert add_trace_ids(None, "info", {}) == {
                "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
            assert headers_for(request())[2:] == [("traceparent", (
                f"00-{context.trace_id:032x}-{context.span_id:016x}-01").encode())]
        assert tracing.current_span() is passed and not tracing.recording()
        assert headers_for(request())[2:] == [("traceparent", UNSAMPLED[0][1])]
    assert tracing.current_span() is not passed
    assert [s.name for s in parent_based.get_finished_spans()] == ["video_poll"]


@pytest.mark.parametrize("traceparent", [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02",  # another flag, unsampled
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-00",  # upper case: invalid
    "00-00000000000000000000000000000000-b7ad6b7169203331-00",  # zero trace id: invalid
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-00",  # zero span id: invalid
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra",  # version 00: invalid
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra",  # a later version
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
])
def test_an_unsampled_parent_read_without_the_propagator_is_what_it_would_read(
    parent_based: InMemorySpanExporter, traceparent: str,
) -> None:
    headers = [("traceparent", traceparent.encode())]
    stage = tracing.start_consumer("generation", headers, request())
    from_propagator = trace.get_current_span(tracing.parent_of(headers))
    expected = from_propagator.get_span_context()
    if expected.is_valid:  # the propagator's parent, passed on as it is, nothing recorded
        assert not stage.is_recording()
        assert stage.get_span_context() == expected
        assert headers_for(request(), stage)[2:] == [
            ("traceparent", f"00-{expected.trace_id:032x}-{expected.span_id:016x}-"
                            f"{int(expected.trace_flags):02x}".encode())]
        with tracing.within(stage):
            assert add_trace_ids(None, "info", {}) == {
                "trace_id": f"{expected.trace_id:032x}", "span_id": f"{expected.span_id:016x}"}
    else:  # not a parent: a new trace, recorded
        assert stage.is_recording()
        assert stage.get_span_context().trace_id != expected.trace_id
        stage.end()


def test_a_sampled_input_gets_a_recorded_child_and_its_calls_too(
    parent_based: InMemorySpanExporter,
) -> None:
    stage = tracing.start_consumer("generation", SAMPLED, request())
    with tracing.within(stage, end=True):
        assert tracing.recording()
        with stage_spans.provider_call("gemini", "gemini-2.5-flash-image", 1):
            pass
    call, generation = parent_based.get_finished_spans()
    assert generation.parent is not None and generation.parent.span_id == 0xb7ad6b7169203331
    assert call.parent is not None
    assert call.parent.span_id == generation.get_span_context().span_id


def test_a_handed_off_span_is_exported_as_the_sdk_would_export_it(
    spans: InMemorySpanExporter,
) -> None:
    stage = tracing.start_consumer("sink costs", [*SAMPLED, ("tracestate", b"vendor=opaque")],
                                   request(), **{"messaging.kafka.offset": 7})
    stage.add_event("retry", {"attempt": 2})
    call = tracing.tracer().start_span("provider_call", links=[
        Link(stage.get_span_context(), {"why": "batch"})])
    call.set_status(StatusCode.ERROR, "503 from the provider")
    call.end()
    stage.end()
    finished = spans.get_finished_spans()
    handed = [rebuilt(marshal.loads(marshal.dumps(compact(span))), span.resource)
              for span in finished]
    assert encode_spans(handed) == encode_spans(finished)


def console_spans(printed: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (one JSON object each)."""
    decoder, spans, at = json.JSONDecoder(), [], printed.find("{")
    while at != -1:
        span, end = decoder.raw_decode(printed, at)
        spans.append(span)
        at = printed.find("{", end)
    return spans


def test_the_helper_process_exports_every_span_handed_to_it(
    capfd: pytest.CaptureFixture[str],
) -> None:

    provider = TracerProvider(resource=Resource({"service.name": "aipipe-test"}))
    handoff = hand_off(provider.resource, "console")
    provider.add_span_processor(handoff)
    tracer = provider.get_tracer("test")
    for number in range(3):
        tracer.start_span(f"hop {number}", attributes={"aipipe.request_id": "req-1"}).end()
    assert handoff.force_flush(30_000)
    handoff.shutdown()
    found = [(span["name"], span["attributes"], span["resource"]["attributes"])
             for span in console_spans(capfd.readouterr().out)]
    assert found == [(f"hop {n}", {"aipipe.request_id": "req-1"},
                      {"service.name": "aipipe-test"}) for n in range(3)]
    assert handoff.dropped == 0


def test_the_helper_ends_with_a_worker_killed_at_once() -> None:
    """SIGKILL leaves no helper behind: its stdin closes and it exports what it has."""
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys\n"
        "from opentelemetry.sdk.resources import Resource\n"
        "from aipipe.span_helper import hand_off\n"
        "handoff = hand_off(Resource({}), 'console')\n"
        "print(handoff._helper.pid, flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    helper = int(worker.stdout.readline())

    def gone() -> bool:
        try:
            with open(f"/proc/{helper}/stat") as stat:  # a zombie until init reaps it
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    assert not gone()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    wait_for(gone, 30, "the span export helper's end", interval=0.05)


def test_a_helper_that_ended_is_started_again_and_nothing_handed_after_is_lost(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = TracerProvider(resource=Resource({"service.name": "aipipe-test"}))
    handoff = hand_off(provider.resource, "console")
    monkeypatch.setattr(handoff, "RESTART_SECONDS", 0.0)
    provider.add_span_processor(handoff)
    first = handoff._helper
    first.kill()
    wait_for(lambda: first.poll() is not None, 30, "the first helper's end", interval=0.05)
    dropped = SPANS_DROPPED.labels("helper_gone")._value.get()
    tracer = provider.get_tracer("test")
    for name in ("after the restart 1", "after the restart 2"):
        tracer.start_span(name).end()
    assert handoff.force_flush(30_000)
    handoff.shutdown()
    assert handoff._helper is not first
    assert [span["name"] for span in console_spans(capfd.readouterr().out)] == [
        "after the restart 1", "after the restart 2"]
    assert SPANS_DROPPED.labels("helper_gone")._value.get() == dropped


# a helper that answers each flush half a second late, noting the flush's number first
SLOW_FLUSH_HELPER = """
import os, sys, time
from aipipe.infra.span_export import _FLUSH, _FLUSHED, _frames
answers = os.fdopen(int(sys.argv[2]), "wb", buffering=0)
with open(sys.argv[1], "a") as answered:
    for kind, payload in _frames(sys.stdin.buffer):
        if kind == _FLUSH:
            time.sleep(0.5)
            answered.write(f"{payload}\\n")
            answered.flush()
            answers.write(_FLUSHED.pack(payload))
"""


def test_a_flush_waits_for_its_own_answer_not_the_late_one_of_a_flush_that_timed_out(
    tmp_path: Path,
) -> None:
    answered = tmp_path / "answered"  # the helper's "exporters" argument: its notes
    handoff = HandOff(Resource({}), str(answered), [sys.executable, "-c", SLOW_FLUSH_HELPER])
    try:
        assert not handoff.force_flush(1)  # gave up before the answer
        assert handoff.force_flush(30_000)
        assert answered.read_text().split() == ["1", "2"]
    finally:
        handoff.shutdown()


def test_a_full_queue_drops_spans_and_counts_them(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing goes before the flush
    provider = TracerProvider()
    handoff = hand_off(provider.resource, "console")
    provider.add_span_processor(handoff)
    before = SPANS_DROPPED.labels("queue_full")._value.get()
    tracer = provider.get_tracer("test")
    for number in range(5):
        tracer.start_span(f"span {number}").end()
    assert handoff.force_flush(30_000)
    handoff.shutdown()
    assert [span["name"] for span in console_spans(capfd.readouterr().out)] == [
        "span 0", "span 1"]
    assert (handoff.dropped, SPANS_DROPPED.labels("queue_full")._value.get() - before) == (3, 3)
