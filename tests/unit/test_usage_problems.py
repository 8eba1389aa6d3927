"""Usage a provider left out or gave past belief: flagged on the completion, priced as given."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from aipipe.schemas.events import OperationAdmitted, Usage
from aipipe.schemas.prices import price_table_at
from aipipe.streams.generation.complete import completed
from aipipe.streams.generation.provider import ProviderResult

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
PRICES = price_table_at(T0)


@pytest.mark.parametrize(("model", "usage", "problem"), [
    ("gemini-2.5-flash", Usage(input_tokens=12, output_tokens=300), None),
    ("gemini-2.5-flash", Usage(input_tokens=12, output_tokens=0), None),  # an empty answer
    ("gemini-2.5-flash", Usage(), "missing"),
    ("gemini-2.5-flash", Usage(input_tokens=0, output_tokens=0), "missing"),
    ("gemini-2.5-flash", Usage(input_tokens=20_000_000_000, output_tokens=1), "implausible"),
    ("gemini-2.5-flash-image", Usage(input_tokens=5, output_tokens=1290, image_count=1), None),
    ("dall-e-3", Usage(image_count=1, image_variant="hd 1024x1792"), None),
    ("dall-e-3", Usage(), "missing"),
    ("dall-e-3", Usage(image_count=500, image_variant="hd 1024x1792"), "implausible"),
    ("stable-image-ultra", Usage(image_count=1), None),
    ("veo-3.0-generate-001", Usage(video_seconds=Decimal(8)), None),
    ("veo-3.0-generate-001", Usage(image_count=3), "missing"),  # a unit the model does not bill
    ("veo-3.0-generate-001", Usage(video_seconds=Decimal(86_400)), "implausible"),
])
def test_usage_problems(model: str, usage: Usage, problem: str | None) -> None:
    assert PRICES.usage_problem(model, usage) == problem


def operation(model: str) -> OperationAdmitted:
    return OperationAdmitted(
        request_id="r1", client_id="acme", operation_id="op-1", requested_at=T0,
        operation_type="text_generation", provider="gemini", model=model,
        params={"prompt": "hi"})


def test_a_completion_names_its_usage_problem_and_keeps_the_reported_price() -> None:
    flash = operation("gemini-2.5-flash")
    missing = completed(flash, ProviderResult(success=True, usage=Usage()), PRICES, 5, T0)
    assert missing.metadata["usage_problem"] == "missing" and missing.cost_usd == 0

    huge = Usage(input_tokens=0, output_tokens=20_000_000)
    implausible = completed(flash, ProviderResult(success=True, usage=huge), PRICES, 5, T0)
    assert implausible.metadata["usage_problem"] == "implausible"
    assert implausible.cost_usd == Decimal(20_000_000) * Decimal("2.50") / 1_000_000

    fine = Usage(input_tokens=3, output_tokens=40)
    assert "usage_problem" not in completed(
        flash, ProviderResult(success=True, usage=fine), PRICES, 5, T0).metadata
    failed = ProviderResult(success=False, usage=Usage(), error_message="quota")
    assert "usage_problem" not in completed(flash, failed, PRICES, 5, T0).metadata
