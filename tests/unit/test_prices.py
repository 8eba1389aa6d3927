from datetime import UTC, datetime
from decimal import Decimal

import pytest

from aipipe.schemas import PricingError, Usage, compute_cost, price_table_at
from aipipe.schemas.prices import ModelPrice, PriceTable, _table

NOW = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        # one 1024px image: 1290 output tokens at $30/M, 10 prompt tokens at $0.30/M
        ("gemini-2.5-flash-image", Usage(input_tokens=10, output_tokens=1290, image_count=1),
         Decimal("0.038703000")),
        ("gemini-2.5-flash-image", Usage(input_tokens=0, output_tokens=5160, image_count=4),
         Decimal("0.154800000")),
        ("gemini-2.5-flash", Usage(input_tokens=1000, output_tokens=1000), Decimal("0.002800000")),
        ("veo-3.0-generate-001", Usage(video_seconds=Decimal(8)), Decimal("3.200000000")),
        ("veo-3.0-fast-generate-001", Usage(video_seconds=Decimal("4.5")), Decimal("0.675000000")),
        ("gemini-2.5-flash", Usage(), Decimal("0E-9")),
    ],
)
def test_cost_from_usage(model: str, usage: Usage, expected: Decimal) -> None:
    assert price_table_at(NOW).cost(model, usage) == expected


def test_cost_rounds_half_up_to_nano_dollars() -> None:
    price = ModelPrice(model="m", source="test", input_per_million_tokens=Decimal("0.0015"))
    assert compute_cost(Usage(input_tokens=1), price) == Decimal("0.000000002")  # 1.5e-9


def test_every_price_cites_its_source() -> None:
    for price in price_table_at(NOW).prices.values():
        assert price.source.startswith("https://")


def test_unknown_model_names_the_model_and_the_fix() -> None:
    with pytest.raises(PricingError, match=r"'gpt-x' has no price.*add it to schemas/prices\.py"):
        price_table_at(NOW).cost("gpt-x", Usage())


def test_the_table_in_force_follows_effective_dates() -> None:
    old = _table("v1", "2025-01-01", ModelPrice(model="m", source="s", per_image=Decimal(1)))
    new = _table("v2", "2025-06-01", ModelPrice(model="m", source="s", per_image=Decimal(2)))
    tables: list[PriceTable] = [new, old]
    assert price_table_at(datetime(2025, 5, 31, 23, 59, tzinfo=UTC), tables).version == "v1"
    assert price_table_at(datetime(2025, 6, 1, tzinfo=UTC), tables).version == "v2"
    with pytest.raises(PricingError, match="No price table is in force"):
        price_table_at(datetime(2024, 1, 1, tzinfo=UTC), tables)
