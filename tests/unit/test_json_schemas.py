from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import jsonschema
import orjson
import pytest

from schemas import EVENT_TYPES, OperationCompleted, OperationRequested, Usage, encode
from schemas.events import (
    BudgetSet,
    BudgetThresholdCrossed,
    OperationAdmitted,
    OperationRejected,
    ProviderCircuitClosed,
    ProviderCircuitOpened,
    VideoPolled,
    VideoPollScheduled,
    VideoStarted,
)
from schemas.jsonschema import export_json_schemas, json_schemas

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
