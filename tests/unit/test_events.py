from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aipipe.schemas import (
    EventDecodeError,
    OperationCompleted,
    OperationRequested,
    Usage,
    decode,
    derived_event_id,
    encode,
    operation_event_id,
)


def request(**changes: object) -> OperationRequested:
    fields: dict[str, object] = {
        "request_id": "r-1",
        "client_id": "acme",
        "operation_type": "image_generation",
        "model": "gemini-2.5-flash-image",
        "params": {"prompt": "a chair", "n": 2},
    }
    fields.update(changes)
    return OperationRequested(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    event = request(user_id="u-1", job_id="j-1")
    assert decode(encode(event)) == event


def test_events_are_frozen() -> None:
    with pytest.raises(Exception, match="frozen"):
        request().client_id = "other"  # type: ignore[misc]


def test_occurred_at_is_stored_in_utc() -> None:
    local = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    event = request(occurred_at=local)
    assert event.occurred_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert orjson.loads(encode(event))["occurred_at"] == "2026-01-01T10:00:00Z"


@given(cents=st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False))
def test_cost_survives_the_wire_exactly(cents: Decimal) -> None:
    event = OperationCompleted(
        request_id="r", client_id="c", operation_id="o", requested_at=datetime.now(UTC),
        operation_type="video_generation", provider="simulated", model="veo-3.0-generate-001",
        success=True, usage=Usage(video_seconds=Decimal("8.5")), cost_usd=cents,
        price_version="v", duration_ms=3,
    )
    wire = orjson.loads(encode(event))
    assert isinstance(wire["cost_usd"], str)
    back = decode(encode(event))
    assert isinstance(back, OperationCompleted)
    assert back.cost_usd == cents and back.usage.video_seconds == Decimal("8.5")


def test_derived_ids_are_deterministic_per_step() -> None:
    assert derived_event_id("op", "completed") == derived_event_id("op", "completed")
    assert derived_event_id("op", "completed") != derived_event_id("op", "admitted")


def test_an_operations_event_ids_are_its_clients_own() -> None:
    """Two clients' operations with one id: their completions (and webhook ids) differ."""
    assert operation_event_id("acme", "op", "completed") == \
        operation_event_id("acme", "op", "completed")
    assert operation_event_id("acme", "op", "completed") != \
        operation_event_id("globex", "op", "completed")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{oops", "not valid JSON"),
        (b"[1]", "not an object"),
        (b'{"event_type": "nope"}', "Field 'event_type' is 'nope'"),
        (b"", "not valid JSON"),
    ],
)
def test_undecodable_bytes_get_one_clear_sentence(payload: bytes, message: str) -> None:
    with pytest.raises(EventDecodeError, match=message):
        decode(payload)


def test_a_missing_field_is_named() -> None:
    raw = orjson.loads(encode(request()))
    del raw["client_id"]
    with pytest.raises(EventDecodeError, match=r"Field 'client_id' is missing .* add it"):
        decode(orjson.dumps(raw))


def test_a_bad_value_is_named() -> None:
    raw = orjson.loads(encode(request()))
    raw["operation_type"] = "music_generation"
    with pytest.raises(EventDecodeError, match=r"Field 'operation_type' .* invalid"):
        decode(orjson.dumps(raw))


@pytest.mark.parametrize("hidden", ["\x07", "\x85", "\u2028", "\u202e", "\u2066", "\u200f"])
def test_an_id_with_a_control_or_bidirectional_character_is_refused(hidden: str) -> None:
    """ids land in terminals and the UI: a C1 control or a bidi override there would show
    another id than the one stored."""
    raw = orjson.loads(encode(request()))
    raw["client_id"] = f"acme{hidden}evil"
    with pytest.raises(EventDecodeError, match=r"^Field 'client_id' .* holds a control, "
                                               r"line-separator or bidirectional character"):
        decode(orjson.dumps(raw))
    raw["client_id"] = "café 日本-1"  # printable text in any script is an id
    assert decode(orjson.dumps(raw)).client_id == "café 日本-1"


def test_oversized_messages_are_refused() -> None:
    with pytest.raises(EventDecodeError, match="over the 1000000-byte limit"):
        decode(b" " * 1_000_001)
