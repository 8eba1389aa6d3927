"""The events of the pipeline: frozen pydantic models, one per ``event_type``.

Every event carries the envelope (``event_id``, ``event_type``, ``schema_version``,
``occurred_at`` in UTC, ``request_id``, ``client_id``, optional ``user_id`` and
``job_id``). Events that follow from an ``operation.requested`` carry its ``event_id`` as
``operation_id`` and get a deterministic ``event_id`` of their own (``derived_event_id``),
so a step that is re-run after a crash emits the very same event again.

The wire contract is stricter than the Python constructors, and is exactly what the
exported JSON Schemas say (``schemas/jsonschema.py``): the envelope fields are required
(a constructor defaults them), numbers are JSON numbers, booleans JSON booleans, times
RFC 3339 strings in UTC, money decimal strings, and an event nests at most
``MAX_DEPTH`` levels. ``decode`` applies those rules; the models apply them only when
validated with the ``WIRE`` context.
"""

from __future__ import annotations

import functools
import re
import types
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from itertools import compress, repeat
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    WrapSerializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from aipipe.schemas.errors import EventDecodeError

SCHEMA_VERSION = 1
OperationType = Literal["image_generation", "video_generation", "text_generation"]
RejectReason = Literal["rate_limited", "over_budget", "invalid"]

# -- the wire rules ------------------------------------------------------------------------

WIRE = {"wire": True}  # the validation context of ``decode``
# the envelope fields a message must carry, though a Python constructor defaults them
WIRE_REQUIRED = ("event_id", "event_type", "schema_version", "occurred_at")
MAX_DEPTH = 32  # the event object is level 1; its params/metadata/job at most MAX_DEPTH - 1
MAX_BRACKETS = 20_000  # '{' and '[' characters in one message (``parse``)
MAX_INT = 2**53 - 1  # the largest integer every JSON parser keeps exactly
# RFC 3339 in UTC, to the microsecond. [0-9], not \d: \d is any Unicode digit in Python.
TIME_PATTERN = (
    r"^(?!0000)[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|\+00:00)$"
)
# a non-negative decimal with at most 9 digits on each side of the point
DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?$"
_TIME, _DECIMAL = re.compile(TIME_PATTERN), re.compile(DECIMAL_PATTERN)


def _on_wire(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("wire"))


def _wire_number(value: Any, info: ValidationInfo) -> Any:
    if _on_wire(info) and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError("must be a JSON number, not a string or boolean")
    return value


def _wire_time(value: Any, info: ValidationInfo) -> Any:
    if _on_wire(info) and not (isinstance(value, str) and _TIME.fullmatch(value)):
        raise ValueError("must be an RFC 3339 time in UTC, such as 2026-01-31T12:00:00Z")
    return value


def _wire_decimal(value: Any, info: ValidationInfo) -> Any:
    if _on_wire(info) and not (isinstance(value, str) and _DECIMAL.fullmatch(value)):
        raise ValueError('must be a decimal string such as "0.039", at most 9 digits '
                         "before and after the point")
    return value


def _decimal_text(value: Decimal) -> str:
    return format(value, "f")


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


_CONTAINERS = (dict, list, tuple)


def json_depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests (a scalar 0, ``{}`` 1), counted up to ``limit + 1``.

    Iterative, so no input can exhaust the stack; it stops once past ``limit``.
    """
    if not isinstance(value, _CONTAINERS):
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        # the children that are containers, picked at C speed: a Python loop over the
        # 100,000 numbers of a 1 MB message took six times as long
        containers = compress(children, map(isinstance, children, repeat(_CONTAINERS)))
        stack.extend(zip(containers, repeat(depth + 1)))
    return deepest


# ids are keys in Kafka, Redis and ClickHouse and land in logs and terminals: printable
# only. No C0 or C1 control, no line or paragraph separator, and no bidirectional control
# (which would show another id in a terminal or the UI than the one stored)
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]+$"
_ID = Annotated[str, Field(min_length=1, max_length=200, pattern=ID_PATTERN)]
Count = Annotated[int, Field(ge=0, le=MAX_INT), BeforeValidator(_wire_number)]
Positive = Annotated[int, Field(ge=1, le=MAX_INT), BeforeValidator(_wire_number)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_wire_number)]
Flag = Annotated[bool, Strict()]
Time = Annotated[
    AwareDatetime,
    BeforeValidator(_wire_time),
    AfterValidator(_to_utc),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": TIME_PATTERN}),
]
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=18, decimal_places=9),
    BeforeValidator(_wire_decimal),
    PlainSerializer(_decimal_text, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DECIMAL_PATTERN}),
]
# free-form JSON (params, metadata, job), one level below the event: schemas/jsonschema.py
# turns the marker into a schema that allows no deeper nesting than ``decode`` does
DEPTH_MARKER = "x-aipipe-max-depth"
JsonObject = Annotated[
    dict[str, Any], WithJsonSchema({"type": "object", DEPTH_MARKER: MAX_DEPTH - 1})
]
# where the requester wants its decision or completion POSTed (consumers/webhooks); which
# URLs are allowed is admission's question (AIPIPE_WEBHOOK_ALLOWED_URLS)
CallbackUrl = Annotated[
    str, Field(min_length=8, max_length=2048, pattern=r"^https?://[^\x00-\x20\x7f]+$")
]


def new_event_id() -> str:
    return str(uuid.uuid4())


def derived_event_id(operation_id: str, step: str) -> str:
    """The event id of ``step`` of ``operation_id`` (any stable name): the same on every
    re-run. An operation's events take ``operation_event_id``."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"aipipe:{operation_id}:{step}"))


def operation_key(client_id: str, operation_id: str) -> str:
    """An operation's identity as one string: its client and its id, as the cost table's
    ``(client_id, operation_id)``. An ``event_id`` is unique only within its client."""
    return f"{client_id}\x1f{operation_id}"


def operation_event_id(client_id: str, operation_id: str, step: str) -> str:
    """The event id of ``step`` of one client's operation: the same on every re-run, and
    another than another client's operation with the same id gets (a webhook receiver
    deduplicates by it)."""
    return derived_event_id(operation_key(client_id, operation_id), step)


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """The keys ``model`` takes: its fields' names and aliases."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.update(n for n in (name, field.alias, field.validation_alias) if isinstance(n, str))
    return frozenset(names)


def refuse_unknown_fields(model: type[BaseModel], data: Any) -> Any:
    """``data``, unless it is a dict with a key ``model`` has no field for: then pydantic's
    error for the first such key, carrying how many there are (``_one_sentence``).

    Pydantic's own check reports every unknown key: a 930 KB request with 100,000 of them
    took 330 ms of the event loop to be refused, most of it building 100,000 errors.
    """
    known = _field_names(model)
    if not isinstance(data, dict) or known.issuperset(data):
        return data
    first = next(name for name in data if name not in known)
    count = len(data) - len(data.keys() & known)  # (iterates over the fields only)
    error = PydanticCustomError("extra_forbidden", "Extra inputs are not permitted",
                                {"unknown_fields": count})
    raise ValidationError.from_exception_data(
        model.__name__, [{"type": error, "loc": (first,), "input": data[first]}])


class Closed(BaseModel):
    """A model that refuses a field it does not have with one error, not one per field
    (``refuse_unknown_fields``). Every model ``decode`` reaches is one
    (tests/unit/test_decode_hostile_keys.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        return refuse_unknown_fields(cls, data)


class Event(Closed):
    """The envelope every event shares."""

    event_id: _ID = Field(default_factory=new_event_id)
    schema_version: Annotated[
        int, Field(ge=1, le=SCHEMA_VERSION), BeforeValidator(_wire_number)
    ] = SCHEMA_VERSION
    occurred_at: Time = Field(default_factory=utcnow)
    request_id: _ID
    client_id: _ID
    user_id: _ID | None = None
    job_id: _ID | None = None

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


class OperationSpec(Closed):
    """What was asked for: shared by the requested, admitted and rejected events."""

    operation_type: OperationType
    # bounded: every decision repeats them (a 510 KB model name made a rejection over the
    # producer's 1 MB limit, and the worker died on it after each restart)
    provider: Annotated[str, Field(min_length=1, max_length=64)] = "simulated"
    model: Annotated[str, Field(min_length=1, max_length=200)]
    params: JsonObject = Field(default_factory=dict)


class OperationRequested(Event, OperationSpec):
    event_type: Literal["operation.requested"] = "operation.requested"
    callback_url: CallbackUrl | None = None


class AdmissionFacts(Closed):
    """How admission decided, on both decision events (all optional: older events lack them).

    ``backend`` is the rate limiter that decided (``none``: no limiter was asked, as for
    an invalid or over-budget request, or the limiter failed closed). ``limited_by``,
    ``limit`` and ``window_ms`` name the limit that applied: the one that refused, or on
    admission the one with the fewest slots left. ``decided_at`` is the limiter's clock
    (Redis ``TIME``) at the decision; ``retry_after_ms`` is when a retry can succeed.
    """

    backend: Literal["redis", "memory", "none"] = "none"
    limited_by: Literal["client", "model"] | None = None
    limit: Positive | None = None
    window_ms: Positive | None = None
    remaining: Count | None = None
    decided_at: Time | None = None


class OperationAdmitted(Event, OperationSpec, AdmissionFacts):
    """``requested_at`` is the pipeline's clock at admission: it picks the price table and
    the month; ``client_occurred_at`` is the request's own ``occurred_at``, kept apart."""

    event_type: Literal["operation.admitted"] = "operation.admitted"
    operation_id: _ID
    requested_at: Time
    client_occurred_at: Time | None = None
    callback_url: CallbackUrl | None = None


class OperationRejected(Event, OperationSpec, AdmissionFacts):
    event_type: Literal["operation.rejected"] = "operation.rejected"
    operation_id: _ID
    requested_at: Time
    client_occurred_at: Time | None = None
    callback_url: CallbackUrl | None = None
    reason: RejectReason
    detail: str = ""
    retry_after_ms: Count | None = None


BudgetPeriod = Literal["month", "week", "day"]


class BudgetSet(Event):
    """An operator set a client's budget (``aipipe budget set``); the latest one counts."""

    event_type: Literal["budget.set"] = "budget.set"
    amount_usd: Money
    period: BudgetPeriod = "month"


class BudgetThresholdCrossed(Event):
    """A client's spend reached ``threshold_percent`` of the budget in the period."""

    event_type: Literal["budget.threshold_crossed"] = "budget.threshold_crossed"
    threshold_percent: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_wire_number)]
    period: BudgetPeriod
    period_start: Time
    spend_usd: Money
    budget_usd: Money


class Usage(Closed):
    """What an operation consumed, in the units the price table prices."""

    input_tokens: Count | None = None
    output_tokens: Count | None = None
    image_count: Count | None = None
    video_seconds: Money | None = None
    # images priced by size and quality (dall-e-3): the price table's key, "hd 1024x1792"
    image_variant: Annotated[str, Field(pattern=r"^[a-z0-9]+ [0-9]+x[0-9]+$")] | None = None


INLINE_TEXT_BYTES = 4096  # a text output up to this many UTF-8 bytes also travels inline


class Output(Closed):
    """One result of an operation, in the artifact store (or the provider's own storage).

    ``sha256`` and ``size`` are of the stored bytes; a video the provider wrote to its own
    bucket (Veo's ``gs://``) is referenced as it is, without them. ``text`` repeats a text
    output of at most ``INLINE_TEXT_BYTES`` bytes, so a reader need not fetch it.
    """

    uri: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^[a-z][a-z0-9+.-]*://")]
    mime_type: Annotated[str, Field(pattern=r"^[a-z]+/[A-Za-z0-9.+-]+$", max_length=100)]
    size: Count | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    text: Annotated[str, Field(max_length=INLINE_TEXT_BYTES)] | None = None


class OperationCompleted(Event):
    event_type: Literal["operation.completed"] = "operation.completed"
    operation_id: _ID
    requested_at: Time  # the pipeline's clock at admission
    client_occurred_at: Time | None = None  # the request's own occurred_at
    callback_url: CallbackUrl | None = None  # the request's, where admission allowed it
    operation_type: OperationType
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    success: Flag
    usage: Usage = Field(default_factory=Usage)
    cost_usd: Money
    price_version: str
    duration_ms: Count
    error_message: str | None = None
    poll_count: Count = 0
    metadata: JsonObject = Field(default_factory=dict)
    outputs: Annotated[list[Output], Field(max_length=64)] = Field(default_factory=list)
    # which run of the generation step this is: 2 and more follow interrupted attempts
    attempt: Positive = 1


class VideoPollScheduled(Event):
    event_type: Literal["video.poll_scheduled"] = "video.poll_scheduled"
    operation_id: _ID
    provider_operation: str
    attempt: Positive
    wait_seconds: Seconds
    due_at: Time


class VideoPolled(Event):
    event_type: Literal["video.polled"] = "video.polled"
    operation_id: _ID
    provider_operation: str
    attempt: Positive
    done: Flag
    elapsed_seconds: Seconds
    # why the poll failed (transient: polling goes on; permanent: ``final``)
    error_message: str | None = None
    # polling stops here: the video is done, failed, or waited past the maximum
    final: Flag = False


class VideoStarted(Event):
    """The provider accepted a video; ``provider_operation`` is what every poll asks about."""

    event_type: Literal["video.started"] = "video.started"
    operation_id: _ID
    requested_at: Time
    client_occurred_at: Time | None = None
    callback_url: CallbackUrl | None = None
    operation_type: OperationType = "video_generation"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    provider_operation: Annotated[str, Field(min_length=1)]
    job: JsonObject = Field(default_factory=dict)  # what the provider's polls need
    # set when the requested model's circuit was open and a fallback started the video:
    # {requested, ran, reason, tried}, repeated in the completion's metadata
    fallback: JsonObject | None = None
    # the run of the generation step that started it (2 and more follow interrupted
    # attempts), which the video's completion carries as its own ``attempt``
    attempt: Positive = 1


class ProviderCircuitOpened(Event):
    """Calls to ``provider``/``model`` fail fast until ``cooldown_seconds`` have passed.

    The envelope is that of the operation whose failure opened the circuit.
    """

    event_type: Literal["provider.circuit_opened"] = "provider.circuit_opened"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    failures: Count
    window_seconds: Seconds
    cooldown_seconds: Seconds
    reason: str


class ProviderCircuitClosed(Event):
    """A trial call succeeded after the cool-down: ``provider``/``model`` is called again."""

    event_type: Literal["provider.circuit_closed"] = "provider.circuit_closed"
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    open_seconds: Seconds


class OperationInterrupted(Event):
    """An attempt at an operation started and never finished: its worker stopped mid-call.

    The provider may have done (and billed) that attempt; aipipe records only the attempt
    that completes. Emitted when the operation is taken up again, before attempt
    ``attempt + 1`` starts.
    """

    event_type: Literal["operation.interrupted"] = "operation.interrupted"
    operation_id: _ID
    operation_type: OperationType
    provider: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    attempt: Positive  # the attempt that was interrupted
    reason: str


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
    | OperationInterrupted
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
    "operation.interrupted": OperationInterrupted,
    "budget.set": BudgetSet,
    "budget.threshold_crossed": BudgetThresholdCrossed,
}
_any_event: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)

MAX_EVENT_BYTES = 1_000_000


# -- encoding ------------------------------------------------------------------------------

# JSON types orjson writes byte for byte as pydantic's serializer does (floats, escapes,
# datetimes to the minute of their offset, in UTC as ``Z``: tests/unit/test_encode.py)
_PLAIN_TYPES: frozenset[Any] = frozenset(
    {str, int, float, bool, type(None), datetime, AwareDatetime}
)
_SERIALIZERS = (PlainSerializer, WrapSerializer)


def _plain_annotation(annotation: Any) -> bool:
    """Whether every value ``annotation`` allows is one orjson writes as pydantic does."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        return _plain_annotation(base) and not any(
            isinstance(m, _SERIALIZERS)
            or (isinstance(m, FieldInfo) and (m.alias or m.serialization_alias))
            for m in metadata
        )
    if origin is Literal:
        return all(type(v) in _PLAIN_TYPES for v in get_args(annotation))
    if origin is Union or origin is types.UnionType:
        return all(_plain_annotation(a) for a in get_args(annotation))
    if origin is dict:  # free-form JSON: its values are checked as they are written
        return get_args(annotation) == (str, Any)
    return annotation in _PLAIN_TYPES


def _plain_model(model: type[BaseModel]) -> bool:
    """Whether ``orjson.dumps(event.__dict__)`` is exactly the model's own JSON.

    True for a model whose fields are all plain JSON types (no decimals, nested models,
    custom serializers, aliases or exclusions); its ``__dict__`` holds the fields in the
    serializer's order.
    """
    decorators = model.__pydantic_decorators__
    if decorators.field_serializers or decorators.model_serializers:
        return False
    if model.model_computed_fields or model.model_config.get("extra") != "forbid":
        return False
    return all(
        _plain_annotation(field.annotation)
        and not field.alias
        and not field.serialization_alias
        and not field.exclude
        and not any(isinstance(m, _SERIALIZERS) for m in field.metadata)
        for field in model.model_fields.values()
    )


#: Event types ``encode`` writes with orjson; the others go through pydantic's serializer.
ORJSON_TYPES: frozenset[type[Event]] = frozenset(
    t for t in EVENT_TYPES.values() if _plain_model(t)
)
_ANY: TypeAdapter[Any] = TypeAdapter(Any)
# subclasses of str, int, dict and list, and dataclasses, go to pydantic like any value
# orjson does not know natively (Decimal, bytes, sets, models inside params)
_ORJSON_OPTIONS = (
    orjson.OPT_UTC_Z | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _as_pydantic_writes_it(value: Any) -> orjson.Fragment:
    return orjson.Fragment(_ANY.dump_json(value))


def encode(event: Event) -> bytes:
    """The wire form: compact JSON, decimals as strings, times in ISO 8601 UTC.

    The bytes are pydantic's serializer's for the model (``event`` is already a
    validated frozen model, so nothing is validated again); for the event types in
    ``ORJSON_TYPES`` orjson writes them, four times faster. Where orjson cannot (an
    integer past 64 bits, a dict key that is not a string inside params), pydantic
    does. One known difference: a datetime inside free-form params whose UTC offset has
    seconds (a zone's local mean time before 1900) gets its offset rounded to the
    minute, where pydantic cuts it.
    """
    if type(event) in ORJSON_TYPES:
        try:
            return orjson.dumps(event.__dict__, default=_as_pydantic_writes_it,
                                option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass
    return event.__pydantic_serializer__.to_json(event)


def decode(data: bytes | None) -> AnyEvent:
    """Parse and validate one event; raise ``EventDecodeError`` with one clear sentence."""
    raw, shallow = parse(data)
    return decode_obj(raw, depth_checked=shallow)


def parse(data: bytes | None) -> tuple[Any, bool]:
    """The JSON value of a message, and whether it is known to nest at most ``MAX_DEPTH``
    deep (``decode_obj``'s ``depth_checked``); raise ``EventDecodeError`` as ``decode``."""
    if data is None:
        raise EventDecodeError("The message has no value; send a JSON event object.")
    if len(data) > MAX_EVENT_BYTES:
        raise EventDecodeError(
            f"The message is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit; "
            "keep large payloads out of events and send a reference instead."
        )
    # counted at C speed (those inside strings only overcount): each object or array opens
    # one. Walking 330,000 empty lists in a 1 MB message took a second of the event loop,
    # so a message with more is refused before it is parsed; no event of the pipeline comes
    # near (params, metadata and inline text are each limited far below)
    brackets = data.count(b"{") + data.count(b"[")
    if brackets > MAX_BRACKETS:
        raise EventDecodeError(
            f"The message has {brackets} '{{' and '[' characters (objects, arrays, or "
            f"brackets in text), over the limit of {MAX_BRACKETS}; send flatter JSON, and "
            "long text by reference."
        )
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(
            f"The message is not valid JSON ({exc}); send a JSON object."
        ) from None
    # each level of nesting opens a bracket, so a message with at most MAX_DEPTH of them
    # cannot nest deeper
    return raw, brackets <= MAX_DEPTH


def decode_obj(raw: object, depth_checked: bool = False) -> AnyEvent:
    """Validate one parsed JSON value by the wire rules (see the module docstring);
    ``depth_checked``: the caller knows it nests at most ``MAX_DEPTH`` deep."""
    if not isinstance(raw, dict):
        raise EventDecodeError("The message is JSON but not an object; send a JSON object.")
    event_type = raw.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        what = "missing" if "event_type" not in raw else f"{shown(event_type)}, which is"
        raise EventDecodeError(
            f"Field 'event_type' is {what} not an aipipe event type; use one of: {known}."
        )
    if not depth_checked and json_depth(raw, MAX_DEPTH) > MAX_DEPTH:
        raise EventDecodeError(
            f"This {event_type} event nests more than {MAX_DEPTH} levels deep; flatten "
            "its params or metadata."
        )
    for name in WIRE_REQUIRED:
        if name not in raw:
            why = (" (a unique id the emitter keeps across retries, so a retried event "
                   "counts once)" if name == "event_id" else "")
            raise EventDecodeError(
                f"Field '{name}' is missing from this {event_type} event; add it{why}."
            )
    try:
        return _any_event.validate_python(raw, context=WIRE)
    except ValidationError as exc:
        raise EventDecodeError(_one_sentence(event_type, exc)) from exc


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a sentence never carries a payload."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_sentence(event_type: str, exc: ValidationError) -> str:
    # never many: a model reports all its unknown fields as one error, and every list is
    # bounded (tests/unit/test_decode_hostile_keys.py); building them all is cheap
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [str(part) for part in first["loc"] if str(part) != event_type]
    field = ".".join(loc)[:100] or "(the event)"  # (a field's name is the sender's)
    problems = sum(error.get("ctx", {}).get("unknown_fields", 1) for error in errors)
    more = f" (and {problems - 1} more problems)" if problems > 1 else ""
    if first["type"] == "missing":
        return f"Field '{field}' is missing from this {event_type} event; add it{more}."
    if first["type"] == "string_pattern_mismatch" and first["ctx"]["pattern"] == ID_PATTERN:
        return (
            f"Field '{field}' of this {event_type} event holds a control, line-separator or "
            f"bidirectional character; use printable text only{more}."
        )
    return (
        f"Field '{field}' of this {event_type} event is invalid: {first['msg']}; "
        f"fix the value{more}."
    )
