import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.schemas import (
    EVENT_TYPES,
    EventDecodeError,
    OperationCompleted,
    OperationRequested,
    Usage,
    decode,
    encode,
)
from aipipe.schemas.events import (
    BudgetSet,
    BudgetThresholdCrossed,
    Event,
    OperationAdmitted,
    OperationInterrupted,
    OperationRejected,
    ProviderCircuitClosed,
    ProviderCircuitOpened,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
)
from aipipe.schemas.jsonschema import export_json_schemas, json_schemas

NOW = datetime(2026, 11, 26, tzinfo=UTC)
ENVELOPE = {"request_id": "r", "client_id": "c"}
SPEC = {"operation_type": "image_generation", "model": "gemini-2.5-flash-image"}
SAMPLES = [
    OperationRequested(**ENVELOPE, **SPEC, params={"prompt": "p"}),
    OperationAdmitted(**ENVELOPE, **SPEC, operation_id="o", requested_at=NOW),
    OperationRejected(**ENVELOPE, **SPEC, operation_id="o", requested_at=NOW, reason="invalid"),
    OperationCompleted(
        **ENVELOPE, **SPEC, operation_id="o", requested_at=NOW, provider="simulated",
        success=True, usage=Usage(input_tokens=3, output_tokens=1290, image_count=1),
        cost_usd=Decimal("0.038700900"), price_version="2025-10-01", duration_ms=12,
    ),
    VideoPollScheduled(**ENVELOPE, operation_id="o", provider_operation="ops/1", attempt=1,
                       wait_seconds=2.0, due_at=NOW),
    VideoPolled(**ENVELOPE, operation_id="o", provider_operation="ops/1", attempt=1,
                done=False, elapsed_seconds=2.0),
    VideoStarted(**ENVELOPE, operation_id="o", requested_at=NOW, provider="gemini",
                 model="veo-3.0-generate-001", provider_operation="ops/1",
                 job={"duration_seconds": 8}),
    ProviderCircuitOpened(**ENVELOPE, provider="gemini", model="gemini-2.5-flash-image",
                          failures=5, window_seconds=60, cooldown_seconds=30,
                          reason="503 UNAVAILABLE"),
    ProviderCircuitClosed(**ENVELOPE, provider="gemini", model="gemini-2.5-flash-image",
                          open_seconds=31.5),
    OperationInterrupted(**ENVELOPE, operation_id="o", operation_type="image_generation",
                         provider="gemini", model="gemini-2.5-flash-image", attempt=1,
                         reason="The worker stopped during this attempt."),
    BudgetSet(**ENVELOPE, amount_usd=Decimal("100"), period="month"),
    BudgetThresholdCrossed(**ENVELOPE, threshold_percent=80, period="month", period_start=NOW,
                           spend_usd=Decimal("80.5"), budget_usd=Decimal("100")),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.event_type)
def test_real_events_validate_against_their_schema(event: OperationRequested) -> None:
    jsonschema.validate(orjson.loads(encode(event)), json_schemas()[event.event_type])


def test_a_schema_refuses_what_decode_refuses() -> None:
    wire = orjson.loads(encode(SAMPLES[0]))
    del wire["client_id"]
    with pytest.raises(jsonschema.ValidationError, match="client_id"):
        jsonschema.validate(wire, json_schemas()["operation.requested"])


def test_every_event_type_is_sampled_and_exported(tmp_path: Path) -> None:
    assert {e.event_type for e in SAMPLES} == set(EVENT_TYPES)
    written = export_json_schemas(tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(f"{t}.schema.json" for t in EVENT_TYPES)
    for path in written:
        jsonschema.Draft202012Validator.check_schema(orjson.loads(path.read_bytes()))


# -- one wire contract: the schema and the decoder agree on every input ---------------------

_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _rfc3339(value: object) -> bool:
    """RFC 3339 dates (the pattern leaves impossible days such as February 30 to this)."""
    if isinstance(value, str):
        datetime.fromisoformat(value)
    return True


VALIDATORS = {
    event_type: jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)
    for event_type, schema in json_schemas().items()
}


def verdicts(event_type: str, document: object) -> tuple[bool, bool]:
    """(the schema of ``event_type`` accepts it, ``decode`` makes an ``event_type`` of it)."""
    by_schema = VALIDATORS[event_type].is_valid(document)
    try:
        decoded = decode(json.dumps(document).encode())  # orjson.dumps stops at 255 levels
    except EventDecodeError:
        by_decoder = False
    else:
        by_decoder = isinstance(decoded, EVENT_TYPES[event_type])
    return by_schema, by_decoder


def wire(event: Event) -> dict[str, Any]:
    return dict(orjson.loads(encode(event)))


REQUESTED = {
    "event_id": "5b7c1c9e-1f0a-4c55-9d55-6c1d8d1e9a01", "event_type": "operation.requested",
    "schema_version": 1, "occurred_at": "2026-11-26T12:00:00Z", "request_id": "r-1",
    "client_id": "acme", "operation_type": "image_generation", "provider": "gemini",
    "model": "gemini-2.5-flash-image", "params": {"prompt": "a red chair"},
}
COMPLETED = wire(SAMPLES[3])
POLL = wire(SAMPLES[4])


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep: {"a": {"a": ... {}}}."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()

CASES: list[tuple[str, str, object, bool]] = [
    ("a full request", "operation.requested", REQUESTED, True),
    ("optional fields left out", "operation.requested",
     changed(REQUESTED, provider=_DROP, params=_DROP), True),
    ("user_id null", "operation.requested", changed(REQUESTED, user_id=None), True),
    ("no event_id", "operation.requested", changed(REQUESTED, event_id=_DROP), False),
    ("no event_type", "operation.requested", changed(REQUESTED, event_type=_DROP), False),
    ("no schema_version", "operation.requested", changed(REQUESTED, schema_version=_DROP), False),
    ("no occurred_at", "operation.requested", changed(REQUESTED, occurred_at=_DROP), False),
    ("no client_id", "operation.requested", changed(REQUESTED, client_id=_DROP), False),
    ("an unknown schema_version", "operation.requested", changed(REQUESTED, schema_version=2),
     False),
    ("schema_version 1.0", "operation.requested", changed(REQUESTED, schema_version=1.0), True),
    ("schema_version as a string", "operation.requested",
     changed(REQUESTED, schema_version="1"), False),
    ("a time with +00:00", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00+00:00"), True),
    ("a time with microseconds", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00.123456Z"), True),
    ("a time with 7 fraction digits", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00.1234567Z"), False),
    ("a time not in UTC", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00+02:00"), False),
    ("a naive time", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00"), False),
    ("a space for the T", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26 12:00:00Z"), False),
    ("February 30", "operation.requested",
     changed(REQUESTED, occurred_at="2026-02-30T12:00:00Z"), False),
    ("a leap day", "operation.requested",
     changed(REQUESTED, occurred_at="2028-02-29T12:00:00Z"), True),
    ("a leap second", "operation.requested",
     changed(REQUESTED, occurred_at="2026-12-31T23:59:60Z"), False),
    ("year zero", "operation.requested",
     changed(REQUESTED, occurred_at="0000-01-01T00:00:00Z"), False),
    ("full-width digits", "operation.requested",
     changed(REQUESTED, occurred_at="\uff12\uff10\uff12\uff16-11-26T12:00:00Z"), False),
    ("a unix time", "operation.requested", changed(REQUESTED, occurred_at=1_795_000_000), False),
    ("an empty event_id", "operation.requested", changed(REQUESTED, event_id=""), False),
    ("control characters in client_id", "operation.requested",
     changed(REQUESTED, client_id="mal\u0000lory\u001b[2J"), False),
    ("a non-ASCII client_id", "operation.requested", changed(REQUESTED, client_id="émile"), True),
    # Python's ``re`` (which Python validators use) lets ``$`` match before a last newline
    ("a client_id with a trailing newline", "operation.requested",
     changed(REQUESTED, client_id="acme\n"), False),
    ("a bidi override in client_id", "operation.requested",
     changed(REQUESTED, client_id="acme\u202egpj.exe"), False),
    ("a C1 control in client_id", "operation.requested",
     changed(REQUESTED, client_id="acme\x85"), False),
    ("a time with a trailing newline", "operation.requested",
     changed(REQUESTED, occurred_at="2026-11-26T12:00:00Z\n"), False),
    ("a cost with a trailing newline", "operation.completed",
     changed(COMPLETED, cost_usd="0.5\n"), False),
    ("an event_id of 201 characters", "operation.requested",
     changed(REQUESTED, event_id="e" * 201), False),
    ("a numeric client_id", "operation.requested", changed(REQUESTED, client_id=42), False),
    ("an unknown field", "operation.requested", changed(REQUESTED, priority="high"), False),
    ("an unknown operation type", "operation.requested",
     changed(REQUESTED, operation_type="music_generation"), False),
    ("params as a list", "operation.requested", changed(REQUESTED, params=["a"]), False),
    ("params 31 levels deep", "operation.requested", changed(REQUESTED, params=nested(31)), True),
    ("params 32 levels deep", "operation.requested", changed(REQUESTED, params=nested(32)), False),
    ("params 300 levels deep", "operation.requested",
     changed(REQUESTED, params=nested(300)), False),
    ("an admitted event checked as a request", "operation.requested",
     wire(SAMPLES[1]), False),
    ("a completed event", "operation.completed", COMPLETED, True),
    ("client_occurred_at on it", "operation.completed",
     changed(COMPLETED, client_occurred_at="2026-11-26T11:59:58Z"), True),
    ("cost as a JSON number", "operation.completed", changed(COMPLETED, cost_usd=0.5), False),
    ("cost in exponent form", "operation.completed", changed(COMPLETED, cost_usd="1e-3"), False),
    ("cost with 10 decimal places", "operation.completed",
     changed(COMPLETED, cost_usd="0.0000000001"), False),
    ("cost of a billion dollars", "operation.completed",
     changed(COMPLETED, cost_usd="1000000000"), False),
    ("a negative cost", "operation.completed", changed(COMPLETED, cost_usd="-1"), False),
    ("success as a string", "operation.completed", changed(COMPLETED, success="true"), False),
    ("success as 1", "operation.completed", changed(COMPLETED, success=1), False),
    ("duration 12.0", "operation.completed", changed(COMPLETED, duration_ms=12.0), True),
    ("duration 12.5", "operation.completed", changed(COMPLETED, duration_ms=12.5), False),
    ("duration as a string", "operation.completed", changed(COMPLETED, duration_ms="12"), False),
    ("duration true", "operation.completed", changed(COMPLETED, duration_ms=True), False),
    ("duration past 2^53", "operation.completed", changed(COMPLETED, duration_ms=2**53), False),
    ("a negative duration", "operation.completed", changed(COMPLETED, duration_ms=-1), False),
    ("video seconds as a string", "operation.completed",
     changed(COMPLETED, usage={"video_seconds": "8"}), True),
    ("video seconds as a number", "operation.completed",
     changed(COMPLETED, usage={"video_seconds": 8}), False),
    ("an unknown usage field", "operation.completed",
     changed(COMPLETED, usage={"frames": 3}), False),
    ("metadata 31 levels deep", "operation.completed",
     changed(COMPLETED, metadata=nested(31)), True),
    ("metadata 300 levels deep", "operation.completed",
     changed(COMPLETED, metadata=nested(300)), False),
    ("a poll", "video.poll_scheduled", POLL, True),
    ("a wait of 2 (an integer)", "video.poll_scheduled", changed(POLL, wait_seconds=2), True),
    ("a wait as a string", "video.poll_scheduled", changed(POLL, wait_seconds="2"), False),
    ("a huge wait", "video.poll_scheduled", changed(POLL, wait_seconds=1e300), True),
    ("attempt 0", "video.poll_scheduled", changed(POLL, attempt=0), False),
]


@pytest.mark.parametrize(("event_type", "document", "valid"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_schema_and_the_decoder_agree(event_type: str, document: object, valid: bool) -> None:
    assert verdicts(event_type, document) == (valid, valid)


def test_the_schema_requires_the_envelope() -> None:
    for schema in json_schemas().values():
        assert {"event_id", "event_type", "schema_version", "occurred_at", "request_id",
                "client_id"} <= set(schema["required"])


def test_nesting_past_any_parser_is_refused_in_one_sentence() -> None:
    for depth in (33, 2000):  # 2000: past orjson's own limit of 1024
        with pytest.raises(EventDecodeError, match=r"levels deep|not valid JSON"):
            decode(orjson.dumps(changed(REQUESTED, params=nested(31)))[:-1]
                   + b',"x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")


def test_a_missing_event_id_names_the_retry_rule() -> None:
    with pytest.raises(EventDecodeError, match=r"'event_id' is missing .* keeps across retries"):
        decode(orjson.dumps(changed(REQUESTED, event_id=_DROP)))


_TEXTS = st.sampled_from([
    "", "x", "2026-11-26T12:00:00Z", "2026-02-29T00:00:00Z", "2026-11-26T12:00:00.5+00:00",
    "2026-11-26T12:00:00-00:00", "0.5", "1e3", "00.1", "12", "true", "operation.requested",
    "image_generation", "gemini", "e" * 201,
]) | st.text(max_size=12)
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | _TEXTS)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXTS, inner, max_size=3),
    max_leaves=8,
)
BASES = [("operation.requested", REQUESTED), *((e.event_type, wire(e)) for e in SAMPLES)]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_schema_and_the_decoder_agree_on_mutations(data: st.DataObject) -> None:
    event_type, base = data.draw(st.sampled_from(BASES))
    document = dict(base)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*document, "usage", "extra", "client_occurred_at"]))
        if data.draw(st.booleans()) and key in document:
            del document[key]
        else:
            document[key] = data.draw(JSON_VALUES)
    by_schema, by_decoder = verdicts(event_type, document)
    assert by_schema == by_decoder, document
