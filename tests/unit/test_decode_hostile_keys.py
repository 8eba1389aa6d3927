"""What a message with many unknown keys costs to refuse.

Pydantic reports every unknown key of a model as an error of its own, and the sentence of
a refusal built them all to use the first: a 930 KB request with 100,000 unknown keys held
the event loop for 330-350 ms, and one with them inside ``usage`` or ``outputs`` as long.
Every model refuses them with one error now (``schemas.events.Closed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from aipipe.schemas import EventDecodeError, OperationCompleted, OperationRequested, decode, encode
from aipipe.schemas.events import MAX_EVENT_BYTES, Closed, _any_event

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)
REQUESTED = orjson.loads(encode(OperationRequested(
    client_id="acme", request_id="r1", operation_type="image_generation",
    model="gemini-2.5-flash-image", params={"prompt": "a lighthouse"})))
COMPLETED = orjson.loads(encode(OperationCompleted(
    client_id="acme", request_id="r1", operation_id="o", requested_at=NOW,
    operation_type="image_generation", provider="simulated", model="gemini-2.5-flash-image",
    success=True, cost_usd=Decimal("0.039"), price_version="2025-10-01", duration_ms=12)))
# a decode of any of them took 330-560 ms on a quiet machine before the fix (over 700 ms on
# a busy one), and 13-25 ms after, most of it orjson parsing the keys: this bound leaves
# room for a busy CI machine and none for the old cost
BOUND_SECONDS = 0.1


def keys(count: int) -> dict[str, int]:
    return {format(i, "x"): 0 for i in range(count)}  # "0", "1", ..., "1869f"


def refusal(data: bytes) -> str:
    with pytest.raises(EventDecodeError) as refused:
        decode(data)
    return refused.value.reason


def fastest(run: Callable[[], object], times: int = 5) -> float:
    """The fastest of ``times`` runs after a warm-up, in seconds: the others measure the
    machine's load as much as the code."""
    run()
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(("document", "field", "more"), [
    ({**REQUESTED, **keys(100_000)}, "0", 99_999),
    ({**COMPLETED, "usage": keys(100_000)}, "usage.0", 99_999),
    ({**COMPLETED, "outputs": [keys(1500)] * 64}, "outputs.0.0", 64 * 1500 - 1),
], ids=["top level", "in usage", "in each of 64 outputs"])
def test_a_message_of_unknown_keys_is_refused_quickly_naming_the_first(
    document: dict[str, Any], field: str, more: int,
) -> None:
    data = orjson.dumps(document)
    assert 700_000 < len(data) <= MAX_EVENT_BYTES
    assert refusal(data) == (
        f"Field '{field}' of this {document['event_type']} event is invalid: Extra inputs "
        f"are not permitted; fix the value (and {more} more problems).")
    assert fastest(lambda: refusal(data)) < BOUND_SECONDS


def test_one_unknown_field_is_refused_in_the_sentence_it_always_had() -> None:
    assert refusal(orjson.dumps({**REQUESTED, "priority": "high"})) == (
        "Field 'priority' of this operation.requested event is invalid: Extra inputs are "
        "not permitted; fix the value.")
    assert refusal(orjson.dumps({**COMPLETED, "usage": {"frames": 3}})) == (
        "Field 'usage.frames' of this operation.completed event is invalid: Extra inputs "
        "are not permitted; fix the value.")


def test_a_python_caller_gets_pydantics_own_error_for_an_unknown_field() -> None:
    with pytest.raises(ValidationError) as refused:
        OperationRequested(client_id="acme", request_id="r1", operation_type="image_generation",
                           model="m", priority="high", colour="red")  # type: ignore[call-arg]
    [error] = refused.value.errors(include_url=False)
    assert (error["type"], error["loc"], error["msg"]) == (
        "extra_forbidden", ("priority",), "Extra inputs are not permitted")


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every node of a pydantic core schema."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _nodes(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _nodes(value)


def test_no_part_of_an_event_can_report_an_error_per_key_or_item() -> None:
    """What keeps a refusal's errors few, so building them stays cheap: every model refuses
    unknown fields with one error, every list has a maximum length, and every dict is
    free-form JSON, whose values never fail. A field that breaks this brings the stall
    back."""
    for node in _nodes(_any_event.core_schema):
        kind = node.get("type")
        if kind == "model":
            model = node["cls"]
            assert issubclass(model, Closed) and model.model_config["extra"] == "forbid", model
            # (``refuse_unknown_fields`` knows names and plain aliases, not alias paths)
            assert all(isinstance(f.validation_alias, str | None)
                       for f in model.model_fields.values()), model
        elif kind == "list":
            assert node.get("max_length") is not None, node
        elif kind == "dict":
            assert node["values_schema"]["type"] == "any", node
        else:
            assert kind not in {"set", "frozenset", "tuple", "generator"}, node
