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

from aipipe.schemas.errors import PricingError
from aipipe.schemas.events import Usage

COST_QUANTUM = Decimal("0.000000001")
_MILLION = Decimal(1_000_000)

GEMINI_API_PRICING = "https://ai.google.dev/gemini-api/docs/pricing"
VERTEX_PRICING = "https://cloud.google.com/vertex-ai/generative-ai/pricing"
OPENAI_PRICING = "https://platform.openai.com/docs/pricing"
STABILITY_PRICING = "https://platform.stability.ai/pricing"
# Stability bills in credits: one credit is USD 0.01, a fixed number per generated image
STABILITY_CREDIT_USD = Decimal("0.01")


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
class VariantModelPrice(ModelPrice):
    """A model whose images cost by size and quality (dall-e-3): ``Usage.image_variant``
    names the key, such as ``"hd 1024x1792"``; ``per_image`` does not apply."""

    per_image_variant: Mapping[str, Decimal] = field(default_factory=dict)


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

    def usage_problem(self, model: str, usage: Usage) -> str | None:
        return usage_problem(usage, self.price(model))


#: usage of one operation past these is implausible for any model priced here (Gemini's
#: context is 1M tokens, OpenAI's ``n`` at most 10, a Veo video seconds long)
USAGE_BOUNDS: Mapping[str, int] = MappingProxyType({
    "input_tokens": 10_000_000, "output_tokens": 10_000_000,
    "image_count": 100, "video_seconds": 3600,
})


def usage_problem(usage: Usage, price: ModelPrice) -> str | None:
    """What is wrong with a successful operation's ``usage``, or None.

    ``"missing"``: none of the units ``price`` bills is above zero (an answer without its
    usage would cost nothing); ``"implausible"``: a unit is past ``USAGE_BOUNDS``. Either
    is flagged, not corrected: the cost stays what the provider reported, for an operator
    to reconcile with the provider's invoice.
    """
    if any((getattr(usage, unit) or 0) > bound for unit, bound in USAGE_BOUNDS.items()):
        return "implausible"
    billed = (
        (usage.input_tokens, price.input_per_million_tokens),
        (usage.output_tokens, price.output_per_million_tokens),
        (usage.image_count,
         1 if isinstance(price, VariantModelPrice) else price.per_image),
        (usage.video_seconds, price.per_video_second),
    )
    if not any(amount and rate for amount, rate in billed):
        return "missing"
    return None


def compute_cost(usage: Usage, price: ModelPrice) -> Decimal:
    """The exact cost of ``usage`` at ``price``, rounded half-up to nano-dollars."""
    total = (
        Decimal(usage.input_tokens or 0) * price.input_per_million_tokens / _MILLION
        + Decimal(usage.output_tokens or 0) * price.output_per_million_tokens / _MILLION
        + Decimal(usage.image_count or 0) * _per_image(usage, price)
        + (usage.video_seconds or Decimal(0)) * price.per_video_second
    )
    return total.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def _per_image(usage: Usage, price: ModelPrice) -> Decimal:
    if not isinstance(price, VariantModelPrice):
        return price.per_image
    if usage.image_variant is not None and usage.image_variant in price.per_image_variant:
        return price.per_image_variant[usage.image_variant]
    known = ", ".join(sorted(price.per_image_variant))
    raise PricingError(
        f"Model {price.model!r} prices images by size and quality, and the usage names "
        f"{usage.image_variant!r}; record one of: {known}."
    )


def _table(version: str, effective_from: str, *prices: ModelPrice) -> PriceTable:
    return PriceTable(
        version=version,
        effective_from=datetime.fromisoformat(effective_from).replace(tzinfo=UTC),
        prices=MappingProxyType({p.model: p for p in prices}),
    )


# Output images of gemini-2.5-flash-image are billed as output tokens: 1290 tokens per
# 1024x1024 image at $30 per million tokens, about $0.039 an image.
IMAGE_TOKENS_PER_IMAGE = 1290

_GEMINI_2025_10 = (
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
)


def _stability(model: str, credits: str) -> ModelPrice:
    return ModelPrice(model=model, source=STABILITY_PRICING,
                      per_image=Decimal(credits) * STABILITY_CREDIT_USD)


# From 2026-12-01 the pipeline also calls OpenAI and Stability (prices as published on
# the pages cited, unchanged since they were read for this table; Gemini as before).
# gpt-image-1 bills text input tokens at $5/M and output image tokens at $40/M (a
# 1024x1024 image at medium quality is 1056 output tokens); it takes no input images here.
# dall-e-3 bills per image by quality and size. Stability: credits per image, $0.01 each.
_OPENAI_STABILITY_2026_12 = (
    ModelPrice(
        model="gpt-image-1",
        source=OPENAI_PRICING,
        input_per_million_tokens=Decimal("5.00"),
        output_per_million_tokens=Decimal("40.00"),
    ),
    VariantModelPrice(
        model="dall-e-3",
        source=OPENAI_PRICING,
        per_image_variant=MappingProxyType({
            "standard 1024x1024": Decimal("0.040"),
            "standard 1024x1792": Decimal("0.080"),
            "standard 1792x1024": Decimal("0.080"),
            "hd 1024x1024": Decimal("0.080"),
            "hd 1024x1792": Decimal("0.120"),
            "hd 1792x1024": Decimal("0.120"),
        }),
    ),
    ModelPrice(
        model="gpt-4.1-mini",
        source=OPENAI_PRICING,
        input_per_million_tokens=Decimal("0.40"),
        output_per_million_tokens=Decimal("1.60"),
    ),
    ModelPrice(
        model="gpt-5-mini",
        source=OPENAI_PRICING,
        input_per_million_tokens=Decimal("0.25"),
        output_per_million_tokens=Decimal("2.00"),
    ),
    _stability("stable-image-ultra", "8"),
    _stability("stable-image-core", "3"),
    _stability("sd3.5-large", "6.5"),
    _stability("sd3.5-large-turbo", "4"),
    _stability("sd3.5-medium", "3.5"),
)

PRICE_TABLES: Sequence[PriceTable] = (
    _table("2025-10-01", "2025-10-01", *_GEMINI_2025_10),
    _table("2026-12-01", "2026-12-01", *_GEMINI_2025_10, *_OPENAI_STABILITY_2026_12),
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
