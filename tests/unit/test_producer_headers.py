"""The headers the producer sets: ``request_id`` and ``event_type``, built once per type."""

from __future__ import annotations

from typing import Literal

from aipipe.producers import headers_for
from aipipe.schemas import OperationRequested
from aipipe.schemas.events import Event


def test_a_known_event_type_gets_its_prebuilt_header() -> None:
    event = OperationRequested(request_id="req-1", client_id="c", operation_type="text_generation",
                               model="m")
    assert headers_for(event) == [("request_id", b"req-1"), ("event_type", b"operation.requested")]


def test_an_event_type_outside_the_catalogue_gets_its_own_name() -> None:
    class Custom(Event):
        event_type: Literal["custom.happened"] = "custom.happened"

    assert headers_for(Custom(request_id="req-2", client_id="c")) == [
        ("request_id", b"req-2"), ("event_type", b"custom.happened"),
    ]
