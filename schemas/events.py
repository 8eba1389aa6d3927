"""The events of the pipeline: frozen pydantic models, one per ``event_type``.

Every event carries the envelope (``event_id``, ``event_type``, ``schema_version``,
``occurred_at`` in UTC, ``request_id``, ``client_id``, optional ``user_id`` and
``job_id``). Events that follow from an ``operation.requested`` carry its ``event_id`` as
``operation_id`` and get a deterministic ``event_id`` of their own (``derived_event_id``),
so a step that is re-run after a crash emits the very same event again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
)

from schemas.errors import EventDecodeError

SCHEMA_VERSION = 1
OperationType = Literal["image_generation", "video_generation", "text_generation"]
RejectReason = Literal["rate_limited", "over_budget", "invalid"]

_ID = Annotated[str, Field(min_length=1, max_length=200)]


def new_event_id() -> str:
    return str(uuid.uuid4())


def derived_event_id(operation_id: str, step: str) -> str:
    """The event id of ``step`` for one operation: the same on every re-run."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"aipipe:{operation_id}:{step}"))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every event shares."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: _ID = Field(default_factory=new_event_id)
    schema_version: int = SCHEMA_VERSION
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    request_id: _ID
    client_id: _ID
    user_id: _ID | None = None
    job_id: _ID | None = None

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    def envelope(self, event_id: str, **changes: Any) -> dict[str, Any]:
        """The envelope fields for a follow-on event of the same request."""
        fields = {
            "event_id": event_id,
            "request_id": self.request_id,
            "client_id": self.client_id,
            "user_id": self.user_id,
            "job_id": self.job_id,
        }
        fields.update(changes)
        return fields


class OperationSpec(BaseModel):
    """What was asked for: shared by the requested, admitted and rejected events."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation_type: OperationType
    provider: Annotated[str, Field(min_length=1)] = "simulated"
    model: Annotated[str, Field(min_length=1)]
    params: dict[str, Any] = Field(default_factory=dict)


class OperationRequested(Event, OperationSpec):
    event_type: Literal["operation.requested"] = "operation.requested"


class AdmissionFacts(BaseModel):
    """How admission decided, on both decision events (all optional: older events lack them).

    ``backend`` is the rate limiter that decided (``none``: no limiter was asked, as for
    an invalid or over-budget request, or the limiter failed closed). ``limited_by``,
    ``limit`` and ``window_ms`` name the limit that applied: the one that refused, or on
    admission the one with the fewest slots left. ``decided_at`` is the limiter's clock
    (Redis ``TIME``) at the decision; ``retry_after_ms`` is when a retry can succeed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["redis", "memory", "none"] = "none"
    limited_by: Literal["client", "model"] | None = None
    limit: Annotated[int, Field(ge=1)] | None = None
    window_ms: Annotated[int, Field(ge=1)] | None = None
    remaining: Annotated[int, Field(ge=0)] | None = None
    decided_at: AwareDatetime | None = None


class OperationAdmitted(Event, OperationSpec, AdmissionFacts):
    event_type: Literal["operation.admitted"] = "operation.admitted"
    operation_id: _ID
    requested_at: AwareDatetime


class OperationRejected(Event, OperationSpec, AdmissionFacts):
    event_type: Literal["operation.rejected"] = "operation.rejected"
    operation_id: _ID
    requested_at: AwareDatetime
    reason: RejectReason
    detail: str = ""
    retry_after_ms: Annotated[int, Field(ge=0)] | None = None


BudgetPeriod = Literal["month", "week", "day"]


class BudgetSet(Event):
    """An operator set a client's budget (``aipipe budget set``); the latest one counts."""

    event_type: Literal["budget.set"] = "budget.set"
    amount_usd: Decimal = Field(ge=0, max_digits=18, decimal_places=9)
    period: BudgetPeriod = "month"

    @field_serializer("amount_usd")
    def _amount_as_string(self, value: Decimal) -> str:
        return format(value, "f")


class BudgetThresholdCrossed(Event):
    """A client's spend reached ``threshold_percent`` of the budget in the period."""

    event_type: Literal["budget.threshold_crossed"] = "budget.threshold_crossed"
    threshold_percent: Annotated[int, Field(ge=1, le=1000)]
    period: BudgetPeriod
    period_start: AwareDatetime
    spend_usd: Decimal = Field(ge=0, max_digits=18, decimal_places=9)
    budget_usd: Decimal = Field(ge=0, max_digits=18, decimal_places=9)

    @field_serializer("spend_usd", "budget_usd")
    def _money_as_string(self, value: Decimal) -> str:
        return format(value, "f")


class Usage(BaseModel):
    """What an operation consumed, in the units the price table prices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: Annotated[int, Field(ge=0)] | None = None
    output_tokens: Annotated[int, Field(ge=0)] | None = None
    image_count: Annotated[int, Field(ge=0)] | None = None
    video_seconds: Annotated[Decimal, Field(ge=0)] | None = None

    @field_serializer("video_seconds")
    def _seconds_as_string(self, value: Decimal | None) -> str | None:
        return None if value is None else str(value)


class OperationCompleted(Event):
    event_type: Literal["operation.completed"] = "operation.completed"
    operation_id: _ID
    requested_at: AwareDatetime
    operation_type: OperationType
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    success: bool
    usage: Usage = Field(default_factory=Usage)
    cost_usd: Decimal = Field(ge=0, max_digits=18, decimal_places=9)
    price_version: str
    duration_ms: Annotated[int, Field(ge=0)]
    error_message: str | None = None
    poll_count: Annotated[int, Field(ge=0)] = 0
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_serializer("cost_usd")
    def _cost_as_string(self, value: Decimal) -> str:
        return format(value, "f")


class VideoPollScheduled(Event):
    event_type: Literal["video.poll_scheduled"] = "video.poll_scheduled"
    operation_id: _ID
    provider_operation: str
    attempt: Annotated[int, Field(ge=1)]
    wait_seconds: Annotated[float, Field(ge=0)]
    due_at: AwareDatetime


class VideoPolled(Event):
    event_type: Literal["video.polled"] = "video.polled"
    operation_id: _ID
    provider_operation: str
    attempt: Annotated[int, Field(ge=1)]
    done: bool
    elapsed_seconds: Annotated[float, Field(ge=0)]
    # why the poll failed (transient: polling goes on; permanent: ``final``)
    error_message: str | None = None
    # polling stops here: the video is done, failed, or waited past the maximum
    final: bool = False


class VideoStarted(Event):
    """The provider accepted a video; ``provider_operation`` is what every poll asks about."""

    event_type: Literal["video.started"] = "video.started"
    operation_id: _ID
    requested_at: AwareDatetime
    operation_type: OperationType = "video_generation"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    provider_operation: Annotated[str, Field(min_length=1)]
    job: dict[str, Any] = Field(default_factory=dict)  # what the provider's polls need


class ProviderCircuitOpened(Event):
    """Calls to ``provider``/``model`` fail fast until ``cooldown_seconds`` have passed.

    The envelope is that of the operation whose failure opened the circuit.
    """

    event_type: Literal["provider.circuit_opened"] = "provider.circuit_opened"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    failures: Annotated[int, Field(ge=0)]
    window_seconds: Annotated[float, Field(ge=0)]
    cooldown_seconds: Annotated[float, Field(ge=0)]
    reason: str


class ProviderCircuitClosed(Event):
    """A trial call succeeded after the cool-down: ``provider``/``model`` is called again."""

    event_type: Literal["provider.circuit_closed"] = "provider.circuit_closed"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    open_seconds: Annotated[float, Field(ge=0)]


AnyEvent = Annotated[
    OperationRequested
    | OperationAdmitted
    | OperationRejected
    | OperationCompleted
    | VideoPollScheduled
    | VideoPolled
    | VideoStarted
    | ProviderCircuitOpened
    | ProviderCircuitClosed
    | BudgetSet
    | BudgetThresholdCrossed,
    Field(discriminator="event_type"),
]
EVENT_TYPES: dict[str, type[Event]] = {
    "operation.requested": OperationRequested,
    "operation.admitted": OperationAdmitted,
    "operation.rejected": OperationRejected,
    "operation.completed": OperationCompleted,
    "video.poll_scheduled": VideoPollScheduled,
    "video.polled": VideoPolled,
    "video.started": VideoStarted,
    "provider.circuit_opened": ProviderCircuitOpened,
    "provider.circuit_closed": ProviderCircuitClosed,
    "budget.set": BudgetSet,
    "budget.threshold_crossed": BudgetThresholdCrossed,
}
_any_event: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

MAX_EVENT_BYTES = 1_000_000


def encode(event: Event) -> bytes:
    """The wire form: compact JSON, decimals as strings, times in ISO 8601 UTC."""
    return event.__pydantic_serializer__.to_json(event)


def decode(data: bytes | None) -> AnyEvent:
    """Parse and validate one event; raise ``EventDecodeError`` with one clear sentence."""
    if data is None:
        raise EventDecodeError("The message has no value; send a JSON event object.")
    if len(data) > MAX_EVENT_BYTES:
        raise EventDecodeError(
            f"The message is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit; "
            "keep large payloads out of events and send a reference instead."
        )
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(
            f"The message is not valid JSON ({exc}); send a JSON object."
        ) from None
    return decode_obj(raw)


def decode_obj(raw: object) -> AnyEvent:
    if not isinstance(raw, dict):
        raise EventDecodeError("The message is JSON but not an object; send a JSON object.")
    event_type = raw.get("event_type")
    if event_type not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        raise EventDecodeError(
            f"Field 'event_type' is {event_type!r}, which is not an aipipe event; "
            f"use one of: {known}."
        )
    try:
        return _any_event.validate_python(raw)
    except ValidationError as exc:
        raise EventDecodeError(_one_sentence(event_type, exc)) from exc


def _one_sentence(event_type: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if str(part) != event_type]
    field = ".".join(loc) or "(the event)"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"Field '{field}' is missing from this {event_type} event; add it{more}."
    return (
        f"Field '{field}' of this {event_type} event is invalid: {first['msg']}; "
        f"fix the value{more}."
    )
