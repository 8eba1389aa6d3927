"""What a request near the size limits can make the pipeline produce or do.

The producer refuses a record over 1,000,000 bytes, and a decision it cannot send took
the worker down, again after every restart (the request was never acknowledged). A
message wide rather than deep held the event loop for a second per message.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from aipipe.schemas import OperationRejected, OperationRequested, encode
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import MAX_BRACKETS, MAX_EVENT_BYTES, decode
from aipipe.streams.admission import decide
from aipipe.streams.admission.decide import Rules

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)
PRODUCER_LIMIT = 1_000_000  # faust's (aiokafka's) max_request_size, and the broker's


def near_the_limit(**changes: object) -> OperationRequested:
    """A request that decodes, with params padded to just under the event size limit."""
    body = {"event_id": "e-1", "event_type": "operation.requested", "schema_version": 1,
            "occurred_at": NOW.isoformat(), "request_id": "r", "client_id": "mallory",
            "operation_type": "image_generation", "provider": "simulated",
            "model": "gemini-2.5-flash-image", "params": {"prompt": "p", "pad": ""}, **changes}
    room = MAX_EVENT_BYTES - len(orjson.dumps(body)) - 10
    body["params"] = {"prompt": "p", "pad": "x" * room}
    data = orjson.dumps(body)
    assert MAX_EVENT_BYTES - 20 < len(data) <= MAX_EVENT_BYTES
    request = decode(data)
    assert isinstance(request, OperationRequested)
    return request


@pytest.mark.parametrize(("changes", "rules", "says"), [
    ({"provider": "nope"}, Rules(), "Provider 'nope' is not offered here"),
    ({"callback_url": "https://elsewhere.example/hook"},
     Rules(callback_prefixes=("https://hooks.example/",)), "is not under an allowed webhook"),
    ({}, Rules(), "over the 65536-byte limit"),
])
def test_a_rejection_of_a_request_at_the_size_limit_can_be_sent(
    changes: dict[str, object], rules: Rules, says: str,
) -> None:
    decision = decide(near_the_limit(**changes), NOW, rules)
    assert isinstance(decision, OperationRejected) and says in decision.detail
    assert decision.params == {} and len(encode(decision)) < PRODUCER_LIMIT // 100


def test_a_model_name_is_bounded_where_it_is_decoded() -> None:
    data = encode(near_the_limit()).replace(b'"gemini-2.5-flash-image"', b'"m"')
    data = data.replace(b'"m"', b'"' + b"m" * 510_000 + b'"').replace(b"x" * 510_100, b"")
    assert len(data) <= MAX_EVENT_BYTES
    with pytest.raises(EventDecodeError, match="'model'"):
        decode(data)


def test_a_message_wider_than_the_bracket_limit_is_refused_before_it_is_parsed() -> None:
    lists = b",".join([b"[]"] * (MAX_BRACKETS + 1))
    data = (b'{"event_type":"operation.requested","event_id":"e","params":{"a":['
            + lists + b"]}}")
    assert len(data) < MAX_EVENT_BYTES
    with pytest.raises(EventDecodeError) as refused:
        decode(data)
    assert refused.value.reason == (
        f"The message has {MAX_BRACKETS + 4} '{{' and '[' characters (objects, arrays, or "
        f"brackets in text), over the limit of {MAX_BRACKETS}; send flatter JSON, and long "
        "text by reference.")
