"""The spans of the streams stages, each the child of the span whose context its input carried.

- ``admission``: one span per request of a batch, from the request's receipt to its
  decision on the broker; the decision's headers carry it (``aipipe.decision``,
  ``aipipe.reason``).
- ``generation``: one per admitted operation, current while it runs, so that each provider
  call (``provider_call``, one per attempt: retries and video polls too) is its child and
  the events it emits carry it; the completion adds model, cost and success.
- ``video_poll``: one per due poll, the child of the span that scheduled it (the generation
  for the first, the previous poll after), kept with the pending video in its table entry
  (``carry``), so that the chain survives a restart.

Every function here is called only when ``tracing.enabled``, or returns a shared no-op
block at once when it is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from aipipe.producers import tracing
from aipipe.schemas.events import OperationAdmitted, OperationRejected, VideoStarted, operation_key
from aipipe.streams.generation.polling import pending_entry


def admission(requests: Sequence[Any], carriers: Sequence[Any]) -> dict[str, Any]:
    """A span per request, by its ``operation_key`` (the client and the ``event_id``, the
    decision's ``operation_id``)."""
    return {operation_key(request.client_id, request.event_id):
            tracing.start_consumer("admission", carrier.message.headers, request)
            for request, carrier in zip(requests, carriers, strict=True)}


def decided(spans: Mapping[str, Any], decisions: Sequence[Any]) -> None:
    """End each request's span with its decision (after the decisions are on the broker)."""
    for decision in decisions:
        span = spans.get(operation_key(decision.client_id, decision.operation_id))
        if span is None:
            continue
        if span.is_recording():  # (most of a sampled deployment's spans are not)
            rejected = isinstance(decision, OperationRejected)
            span.set_attributes({"aipipe.decision": "rejected" if rejected else "admitted",
                                 "aipipe.reason": decision.reason if rejected else "admitted",
                                 "aipipe.limiter_backend": decision.backend})
        span.end()


def generation(message: Any, operation: OperationAdmitted) -> AbstractContextManager[None]:
    """The operation's span, current in the block (which ends it); no-op when off."""
    if not tracing.enabled:
        return tracing.within(None)
    return tracing.within(tracing.start_consumer("generation", message.headers, operation),
                          end=True)


def carry(entry: dict[str, Any], headers: Any) -> dict[str, Any]:
    """``entry`` (a pending video) with the trace headers of the event that changed it."""
    found = tracing.carried(headers)
    return {**entry, "trace": found} if found else entry


def poll(pending: Any, video: VideoStarted, attempt: int) -> AbstractContextManager[None]:
    """The poll's span, the child of the span that scheduled it; no-op when off."""
    if not tracing.enabled:
        return tracing.within(None)
    entry = pending_entry(pending.get, video)[1] or {}
    return tracing.within(tracing.start_consumer("video_poll", entry.get("trace"), video,
                                                 **{"aipipe.poll_attempt": attempt}), end=True)


def provider_call(provider: str, model: str, attempt: int) -> AbstractContextManager[Any]:
    """One attempt's span, the child of the current one (generation or poll); no-op when off."""
    if not tracing.enabled or not tracing.recording():
        return tracing.within(None)
    return tracing.tracer().start_as_current_span(
        "provider_call", attributes={"aipipe.provider": provider, "aipipe.model": model,
                                     "aipipe.attempt": attempt})
