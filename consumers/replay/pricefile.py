"""Price tables from a file, for re-pricing history (``aipipe replay --price-table FILE``).

A TOML (``.toml``) or JSON (``.json``) file with the fields of ``aipipe.schemas.prices.PriceTable``;
amounts are strings or numbers in USD, read as exact decimals::

    version = "what-if-2026-12"        # recorded as price_version on every re-priced row
    effective_from = "2026-12-01"      # optional, informational
    extends = "2025-10-01"             # optional: a built-in version whose models are kept

    [models."gemini-2.5-flash-image"]
    input_per_million_tokens = "0.30"
    output_per_million_tokens = "60.00"
    per_image = "0"                    # units a model does not bill may be left out
    per_video_second = "0"
    source = "our negotiated rate"     # optional

A model listed replaces the ``extends`` price of that model as a whole.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aipipe.schemas.errors import PricingError
from aipipe.schemas.prices import PRICE_TABLES, ModelPrice, PriceTable

_UNITS = ("input_per_million_tokens", "output_per_million_tokens", "per_image",
          "per_video_second")


def builtin_price_table(version: str) -> PriceTable:
    """The built-in table ``version`` (see ``schemas/prices.py``)."""
    for table in PRICE_TABLES:
        if table.version == version:
            return table
    known = ", ".join(t.version for t in PRICE_TABLES)
    raise PricingError(f"Price version {version!r} is not built in; use one of: {known}.")


def _amount(raw: object, where: str) -> Decimal:
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        value = Decimal(-1)
    if isinstance(raw, bool) or not value.is_finite() or value < 0:
        raise PricingError(f"{where} is {raw!r}; write a price in USD such as \"0.30\".")
    return value


def price_table_from_mapping(
    data: Mapping[str, Any], origin: str = "the price table"
) -> PriceTable:
    """Validate ``data`` (parsed TOML or JSON) into a ``PriceTable``; one sentence on error."""
    unknown = set(data) - {"version", "effective_from", "extends", "models"}
    if unknown:
        raise PricingError(f"{origin} has unknown fields {sorted(unknown)}; use version, "
                           "effective_from, extends and models.")
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise PricingError(f"{origin} has no 'version'; add version = \"a-name\".")
    base: dict[str, ModelPrice] = {}
    if data.get("extends") is not None:
        base = dict(builtin_price_table(str(data["extends"])).prices)
    models = data.get("models", {})
    if not isinstance(models, Mapping) or not (models or base):
        raise PricingError(f"{origin} prices no model; add a [models.\"NAME\"] section.")
    for name, fields in models.items():
        where = f"models.{name!r} in {origin}"
        if not isinstance(fields, Mapping):
            raise PricingError(f"{where} is not a table of prices.")
        extra = set(fields) - {*_UNITS, "source"}
        if extra:
            raise PricingError(f"{where} has unknown fields {sorted(extra)}; use "
                               f"{', '.join(_UNITS)} and source.")
        base[name] = ModelPrice(
            model=name,
            source=str(fields.get("source", origin)),
            **{unit: _amount(fields.get(unit, 0), f"{unit} of {where}") for unit in _UNITS},
        )
    effective = data.get("effective_from")
    try:
        when = (datetime.fromisoformat(str(effective)) if effective is not None
                else datetime(1970, 1, 1))
    except ValueError:
        raise PricingError(f"effective_from {effective!r} in {origin} is not an ISO "
                           "date.") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return PriceTable(version=version, effective_from=when, prices=MappingProxyType(base))


def load_price_table(path: Path) -> PriceTable:
    """Read a ``.toml`` or ``.json`` price table file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PricingError(f"Cannot read price table {path} ({exc.strerror}).") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise PricingError(f"Price table {path} is not valid {kind}: {exc}.") from exc
    if not isinstance(data, dict):
        raise PricingError(f"Price table {path} is not a table of fields.")
    return price_table_from_mapping(data, str(path))


def price_table_json(table: PriceTable) -> dict[str, Any]:
    """The table as JSON (for the manifest): prices as strings."""
    return {
        "version": table.version,
        "effective_from": table.effective_from.isoformat(),
        "models": {
            name: {unit: format(getattr(p, unit), "f") for unit in _UNITS}
            for name, p in sorted(table.prices.items())
        },
    }
