import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from aipipe.schemas import OperationAdmitted, OperationRejected, OperationRequested, price_table_at
from aipipe.schemas.prices import PRICE_TABLES
from aipipe.streams.admission import decide
from aipipe.streams.admission.decide import Rules
from aipipe.streams.generation import SimulatedProvider, completed

NOW = datetime(2026, 11, 26, tzinfo=UTC)
PRICES = price_table_at(NOW)
CLIENT_CLOCK = datetime(2024, 3, 1, tzinfo=UTC)  # the client's own occurred_at: before any price


def request(model: str = "gemini-2.5-flash-image", occurred_at: datetime = CLIENT_CLOCK,
            **params: object) -> OperationRequested:
    return OperationRequested(
        request_id="r", client_id="acme", user_id="u", operation_type="image_generation",
        model=model, params={"prompt": "x" * 40, **params}, occurred_at=occurred_at,
    )


def test_a_priced_model_is_admitted_with_a_deterministic_id() -> None:
    first, again = decide(request(), NOW), decide(request(), NOW)
    assert isinstance(first, OperationAdmitted)
    assert first.operation_id != first.event_id
    assert (first.client_id, first.user_id) == ("acme", "u")
    req = request()
    assert decide(req, NOW).event_id == decide(req, NOW).event_id
    assert again.params == first.params


def test_the_pipelines_clock_bills_and_the_clients_is_kept() -> None:
    """A backdated occurred_at (before the first price table) neither raises nor bills."""
    assert min(t.effective_from for t in PRICE_TABLES) > CLIENT_CLOCK
    admitted = decide(request(), NOW)
    assert isinstance(admitted, OperationAdmitted)
    assert (admitted.requested_at, admitted.client_occurred_at) == (NOW, CLIENT_CLOCK)
    done = completed(admitted, asyncio.run(SimulatedProvider().generate(admitted)),
                     price_table_at(admitted.requested_at), duration_ms=1, now=NOW)
    assert (done.requested_at, done.client_occurred_at) == (NOW, CLIENT_CLOCK)


@pytest.mark.parametrize(("occurred_at", "detail"), [
    (NOW + timedelta(minutes=5, seconds=1), "more than 300 s ahead of the pipeline's clock"),
    (datetime(1999, 12, 31, 23, 59, tzinfo=UTC), "before 2000-01-01"),
])
def test_an_unbelievable_client_clock_is_invalid(occurred_at: datetime, detail: str) -> None:
    decision = decide(request(occurred_at=occurred_at), NOW)
    assert isinstance(decision, OperationRejected) and decision.reason == "invalid"
    assert detail in decision.detail and "send the time the event happened" in decision.detail
    assert decision.requested_at == NOW and decision.client_occurred_at == occurred_at


@pytest.mark.parametrize("occurred_at", [NOW + timedelta(minutes=5),
                                         datetime(2000, 1, 1, tzinfo=UTC)])
def test_the_edges_of_the_accepted_skew_are_admitted(occurred_at: datetime) -> None:
    assert isinstance(decide(request(occurred_at=occurred_at), NOW), OperationAdmitted)


def test_a_request_older_than_the_dedup_horizon_less_the_skew_is_refused() -> None:
    """Remembered for the horizon after its decision, and decided no earlier than its
    occurred_at less the skew: past horizon - skew a redelivery could run a second time."""
    rules = Rules(max_age=timedelta(hours=168) - timedelta(minutes=5))
    edge = NOW - rules.max_age  # type: ignore[operator]
    assert isinstance(decide(request(occurred_at=edge), NOW, rules), OperationAdmitted)
    decision = decide(request(occurred_at=edge - timedelta(milliseconds=1)), NOW, rules)
    assert isinstance(decision, OperationRejected) and decision.reason == "invalid"
    assert decision.detail == (
        "Field 'occurred_at' is 2026-11-19T00:04:59Z, older than the 167.917 h this pipeline "
        "remembers requests for, so it may have run already; send a new request with a new "
        "event_id if it is still wanted.")


def test_the_horizon_must_outlast_the_skew() -> None:
    from aipipe.infra.settings import Settings

    with pytest.raises(ValueError, match=r"AIPIPE_DEDUP_HORIZON_HOURS .* must be longer"):
        Settings(dedup_horizon_hours=0.05, clock_skew_seconds=300)
    assert Settings(dedup_horizon_hours=0.05, clock_skew_seconds=10).dedup_horizon_hours == 0.05


def test_a_provider_that_is_not_offered_is_invalid_with_the_offered_ones() -> None:
    decision = decide(request(), NOW, Rules(providers=frozenset({"gemini"})))
    assert isinstance(decision, OperationRejected) and decision.reason == "invalid"
    assert decision.detail == "Provider 'simulated' is not offered here; use one of: gemini."


def test_bad_params_are_invalid_and_not_echoed() -> None:
    decision = decide(request(n=1e30), NOW)
    assert isinstance(decision, OperationRejected) and decision.reason == "invalid"
    assert decision.detail.startswith("Field 'params.n' must be a whole number from 1 to 4")
    assert decision.params == {}


def test_an_unpriced_model_is_rejected_as_invalid_with_the_reason() -> None:
    decision = decide(request(model="dall-e-9"), NOW)
    assert isinstance(decision, OperationRejected)
    assert decision.reason == "invalid"
    assert "'dall-e-9' has no price" in decision.detail


def test_simulated_generation_is_deterministic_and_priced() -> None:
    admitted = decide(request(n=3), NOW)
    assert isinstance(admitted, OperationAdmitted)
    provider = SimulatedProvider()
    result = asyncio.run(provider.generate(admitted))
    assert result == asyncio.run(provider.generate(admitted))
    event = completed(admitted, result, PRICES, duration_ms=5, now=NOW)
    # 10 prompt tokens at $0.30/M + 3 images x 1290 tokens at $30/M
    assert event.cost_usd == Decimal("0.116103000")
    assert event.usage.image_count == 3 and event.success


def test_a_scripted_failure_costs_nothing() -> None:
    admitted = decide(request(simulate={"fail": True}), NOW)
    assert isinstance(admitted, OperationAdmitted)
    result = asyncio.run(SimulatedProvider().generate(admitted))
    event = completed(admitted, result, PRICES, duration_ms=1, now=NOW)
    assert (event.success, event.cost_usd, event.error_message) == (
        False, Decimal(0), "simulated provider failure"
    )
