import asyncio
from datetime import UTC, datetime
from decimal import Decimal

from schemas import OperationAdmitted, OperationRejected, OperationRequested, price_table_at
from streams.admission import decide
from streams.generation import SimulatedProvider, completed

NOW = datetime(2026, 11, 26, tzinfo=UTC)
PRICES = price_table_at(NOW)


def request(model: str = "gemini-2.5-flash-image", **params: object) -> OperationRequested:
    return OperationRequested(
        request_id="r", client_id="acme", user_id="u", operation_type="image_generation",
        model=model, params={"prompt": "x" * 40, **params}, occurred_at=NOW,
    )


def test_a_priced_model_is_admitted_with_a_deterministic_id() -> None:
    first, again = decide(request(), PRICES), decide(request(), PRICES)
    assert isinstance(first, OperationAdmitted)
    assert first.operation_id != first.event_id
    assert (first.client_id, first.user_id, first.requested_at) == ("acme", "u", NOW)
    req = request()
    assert decide(req, PRICES).event_id == decide(req, PRICES).event_id
    assert again.params == first.params


def test_an_unpriced_model_is_rejected_as_invalid_with_the_reason() -> None:
    decision = decide(request(model="dall-e-9"), PRICES)
    assert isinstance(decision, OperationRejected)
    assert decision.reason == "invalid"
    assert "'dall-e-9' has no price" in decision.detail


def test_simulated_generation_is_deterministic_and_priced() -> None:
    admitted = decide(request(n=3), PRICES)
    assert isinstance(admitted, OperationAdmitted)
    provider = SimulatedProvider()
    result = asyncio.run(provider.generate(admitted))
    assert result == asyncio.run(provider.generate(admitted))
    event = completed(admitted, result, PRICES, duration_ms=5, now=NOW)
    # 10 prompt tokens at $0.30/M + 3 images x 1290 tokens at $30/M
    assert event.cost_usd == Decimal("0.116103000")
    assert event.usage.image_count == 3 and event.success


def test_a_scripted_failure_costs_nothing() -> None:
    admitted = decide(request(simulate={"fail": True}), PRICES)
    assert isinstance(admitted, OperationAdmitted)
    result = asyncio.run(SimulatedProvider().generate(admitted))
    event = completed(admitted, result, PRICES, duration_ms=1, now=NOW)
    assert (event.success, event.cost_usd, event.error_message) == (
        False, Decimal(0), "simulated provider failure"
    )
