"""``encode`` writes exactly the bytes of pydantic's serializer, through orjson where it can."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, Field, PlainSerializer

from aipipe.schemas.events import (
    EVENT_TYPES,
    ORJSON_TYPES,
    BudgetSet,
    Event,
    OperationCompleted,
    OperationRequested,
    Usage,
    _plain_model,
    decode,
    encode,
)


def pydantic_json(event: Event) -> bytes:
    return event.__pydantic_serializer__.to_json(event)


def request(params: dict[str, Any]) -> OperationRequested:
    return OperationRequested(
        request_id="r-1", client_id="acme", user_id="u-1", operation_type="image_generation",
        model="gemini-2.5-flash-image", params=params,
        occurred_at=datetime(2026, 12, 1, 6, 30, 0, 120, tzinfo=UTC),
    )


class Colour(enum.Enum):
    RED = "red"


@dataclass
class Point:
    x: int
    y: float


# every kind of value a Python caller can put in params: JSON types, values orjson writes
# natively (dates, UUIDs, enums) and values it leaves to pydantic (decimals, bytes, sets,
# dataclasses, durations, integers past 64 bits, non-string keys)
whole_minute_zones = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)),
     ZoneInfo("Europe/London"), ZoneInfo("America/New_York")]
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
    st.datetimes(min_value=datetime(1950, 1, 1), timezones=whole_minute_zones),
    st.dates(), st.uuids(), st.just(Colour.RED), st.decimals(allow_nan=False),
    st.text().map(str.encode), st.frozensets(st.integers(0, 9)),
    st.builds(Point, st.integers(), st.floats(allow_nan=False)),
    st.timedeltas(min_value=timedelta(0)),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.dictionaries(st.integers(0, 9), inner, max_size=2),  # keys pydantic turns to text
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(st.text(max_size=10), values, max_size=5))
def test_params_of_any_kind_encode_as_pydantic_writes_them(params: dict[str, Any]) -> None:
    event = request(params)
    assert encode(event) == pydantic_json(event)


def test_a_plain_request_takes_orjson_and_round_trips() -> None:
    event = request({"prompt": "a lighthouse", "n": 2, "ratio": 1.5, "seed": None})
    assert type(event) in ORJSON_TYPES
    assert encode(event) == pydantic_json(event)
    assert decode(encode(event)) == event


def test_which_event_types_take_orjson() -> None:
    """Decimals (money) and nested models are pydantic's to write; the rest orjson's."""
    through_pydantic = {name for name, cls in EVENT_TYPES.items() if cls not in ORJSON_TYPES}
    assert through_pydantic == {"operation.completed", "budget.set", "budget.threshold_crossed"}


def test_events_with_money_and_nested_models_encode_as_before() -> None:
    completed = OperationCompleted(
        request_id="r-1", client_id="acme", operation_id="op-1",
        requested_at=datetime(2026, 12, 1, tzinfo=UTC), operation_type="text_generation",
        provider="gemini", model="gemini-2.5-flash", success=True,
        usage=Usage(input_tokens=3, output_tokens=5), cost_usd=Decimal("0.000123400"),
        price_version="2026-11", duration_ms=12, metadata={"d": Decimal("1E+3")},
    )
    budget = BudgetSet(request_id="r-2", client_id="acme", amount_usd=Decimal("250"))
    for event in (completed, budget):
        assert encode(event) == pydantic_json(event)
    assert b'"cost_usd":"0.000123400"' in encode(completed)


def test_an_integer_past_64_bits_falls_back_to_pydantic() -> None:
    event = request({"big": 2**70, "keys": {1: "one"}})
    assert encode(event) == pydantic_json(event)
    assert b'"big":1180591620717411303424' in encode(event)


def test_the_one_known_difference_a_sub_minute_utc_offset_inside_params() -> None:
    """Amsterdam's 1850 offset was +00:19:32: orjson rounds it, pydantic cuts it."""
    event = request({"at": datetime(1850, 1, 1, tzinfo=ZoneInfo("Europe/Amsterdam"))})
    assert b'"at":"1850-01-01T00:00:00+00:20"' in encode(event)
    assert b'"at":"1850-01-01T00:00:00+00:19"' in pydantic_json(event)


def test_a_model_with_a_serializer_an_alias_or_a_decimal_is_not_written_by_orjson() -> None:
    class Custom(Event):
        model_config = ConfigDict(frozen=True, extra="forbid")
        shout: Annotated[str, PlainSerializer(str.upper, return_type=str)]

    class Aliased(Event):
        model_config = ConfigDict(frozen=True, extra="forbid")
        name: str = Field(serialization_alias="n")

    class Priced(Event):
        model_config = ConfigDict(frozen=True, extra="forbid")
        price: Decimal | None = None

    class Plain(Event):
        model_config = ConfigDict(frozen=True, extra="forbid")
        count: int | None = None
        at: datetime
        tags: dict[str, Any] = Field(default_factory=dict)

    assert [_plain_model(m) for m in (Custom, Aliased, Priced, Plain)] == [
        False, False, False, True,
    ]


def test_an_unknown_event_subclass_is_written_by_pydantic() -> None:
    class Extended(OperationRequested):
        note: str = "n"

    event = Extended(request_id="r", client_id="c", operation_type="text_generation",
                     model="m", occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert type(event) not in ORJSON_TYPES
    assert encode(event) == pydantic_json(event)


def test_dates_uuids_and_enums_in_params_match() -> None:
    event = request({"d": date(2026, 1, 2), "u": uuid.UUID(int=7), "c": Colour.RED})
    assert encode(event) == pydantic_json(event)
