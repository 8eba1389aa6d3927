"""The price table: versioned, with effective dates, and the cost of an operation from usage.

Each price cites where it was published. Costs are exact decimals, rounded half-up to
nine places (nano-dollars), the precision of the ``cost_usd`` column in ClickHouse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from types import MappingProxyType

from schemas.errors import PricingError
from schemas.events import Usage

COST_QUANTUM = Decimal("0.000000001")
_MILLION = Decimal(1_000_000)

GEMINI_API_PRICING = "https://ai.google.dev/gemini-api/docs/pricing"
VERTEX_PRICING = "https://cloud.google.com/vertex-ai/generative-ai/pricing"


@dataclass(frozen=True)
class ModelPrice:
    """Prices of one model, in USD; a unit a model does not bill is zero."""

    model: str
    source: str
    input_per_million_tokens: Decimal = Decimal(0)
    output_per_million_tokens: Decimal = Decimal(0)
    per_image: Decimal = Decimal(0)
    per_video_second: Decimal = Decimal(0)


@dataclass(frozen=True)
class PriceTable:
    """All model prices in force from ``effective_from`` until the next version."""

    version: str
    effective_from: datetime
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)

    def price(self, model: str) -> ModelPrice:
        try:
            return self.prices[model]
        except KeyError:
            known = ", ".join(sorted(self.prices))
            raise PricingError(
                f"Model {model!r} has no price in price table {self.version}; "
                f"use one of: {known}, or add it to schemas/prices.py."
            ) from None

    def cost(self, model: str, usage: Usage) -> Decimal:
        return compute_cost(usage, self.price(model))


def compute_cost(usage: Usage, price: ModelPrice) -> Decimal:
    """The exact cost of ``usage`` at ``price``, rounded half-up to nano-dollars."""
    total = (
        Decimal(usage.input_tokens or 0) * price.input_per_million_tokens / _MILLION
        + Decimal(usage.output_tokens or 0) * price.output_per_million_tokens / _MILLION
        + Decimal(usage.image_count or 0) * price.per_image
        + (usage.video_seconds or Decimal(0)) * price.per_video_second
    )
    return total.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def _table(version: str, effective_from: str, *prices: ModelPrice) -> PriceTable:
    return PriceTable(
        version=version,
        effective_from=datetime.fromisoformat(effective_from).replace(tzinfo=UTC),
        prices=MappingProxyType({p.model: p for p in prices}),
    )


# Output images of gemini-2.5-flash-image are billed as output tokens: 1290 tokens per
# 1024x1024 image at $30 per million tokens, about $0.039 an image.
IMAGE_TOKENS_PER_IMAGE = 1290

PRICE_TABLES: Sequence[PriceTable] = (
    _table(
        "2025-10-01",
        "2025-10-01",
        ModelPrice(
            model="gemini-2.5-flash-image",
            source=GEMINI_API_PRICING,
            input_per_million_tokens=Decimal("0.30"),
            output_per_million_tokens=Decimal("30.00"),
        ),
        ModelPrice(
            model="gemini-2.5-flash",
            source=GEMINI_API_PRICING,
            input_per_million_tokens=Decimal("0.30"),
            output_per_million_tokens=Decimal("2.50"),
        ),
        ModelPrice(
            model="veo-3.0-generate-001",
            source=VERTEX_PRICING,
            per_video_second=Decimal("0.40"),
        ),
        ModelPrice(
            model="veo-3.0-fast-generate-001",
            source=VERTEX_PRICING,
            per_video_second=Decimal("0.15"),
        ),
    ),
)


def price_table_at(when: datetime, tables: Sequence[PriceTable] = PRICE_TABLES) -> PriceTable:
    """The table in force at ``when``: the latest whose ``effective_from`` is not after it."""
    in_force = [t for t in tables if t.effective_from <= when]
    if not in_force:
        first = min(tables, key=lambda t: t.effective_from)
        raise PricingError(
            f"No price table is in force at {when.isoformat()}; the earliest, "
            f"{first.version}, starts at {first.effective_from.isoformat()}."
        )
    return max(in_force, key=lambda t: t.effective_from)
