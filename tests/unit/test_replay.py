"""Replay's pure parts: price table files, re-pricing, and naming differences."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from aipipe.consumers.costs.rows import CostRow
from aipipe.consumers.replay.pricefile import load_price_table, price_table_from_mapping
from aipipe.consumers.replay.replay import Manifest, Range
from aipipe.consumers.replay.reprice import RepriceReport, reprice
from aipipe.consumers.replay.verify import Cell, diff_buckets, diff_rows, range_condition
from aipipe.schemas.errors import PricingError

T = datetime(2026, 11, 2, tzinfo=UTC)


def row(op: str = "op-1", model: str = "gemini-2.5-flash-image", success: bool = True,
        **changes: object) -> CostRow:
    base = CostRow(
        operation_id=op, event_id=f"e-{op}", client_id="acme", user_id=None, request_id="r",
        job_id=None, operation_type="image_generation", provider="simulated", model=model,
        cost_usd=Decimal("0.0387072"), price_version="2025-10-01", input_tokens=24,
        output_tokens=1290, image_count=1, video_duration_seconds=None, poll_count=0,
        metadata="{}", success=success, error_message=None, duration_ms=10, requested_at=T,
        created_at=T, kafka_topic="t", kafka_partition=0, kafka_offset=5,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_toml_price_table_extends_a_built_in_one(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('version = "v2"\nextends = "2025-10-01"\n[models."gemini-2.5-flash-image"]\n'
                    'output_per_million_tokens = "60"\n')
    table = load_price_table(path)
    assert table.version == "v2"
    assert table.prices["gemini-2.5-flash-image"].output_per_million_tokens == Decimal(60)
    assert table.prices["gemini-2.5-flash-image"].input_per_million_tokens == 0
    assert table.prices["veo-3.0-generate-001"].per_video_second == Decimal("0.40")


def test_a_json_price_table_without_extends_prices_only_its_models(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"version": "j", "models": {"m": {"per_image": 0.5}}}')
    table = load_price_table(path)
    assert list(table.prices) == ["m"] and table.prices["m"].per_image == Decimal("0.5")
    with pytest.raises(PricingError, match="'other' has no price in price table j"):
        table.price("other")


@pytest.mark.parametrize(("data", "message"), [
    ({"models": {"m": {}}}, "has no 'version'"),
    ({"version": "v", "models": {"m": {"per_image": "-1"}}}, "per_image of models"),
    ({"version": "v", "models": {"m": {"per_token": "1"}}}, "unknown fields"),
    ({"version": "v", "extends": "1999"}, "not built in"),
    ({"version": "v"}, "prices no model"),
])
def test_a_bad_price_table_says_what_to_fix(data: dict[str, object], message: str) -> None:
    with pytest.raises(PricingError, match=message):
        price_table_from_mapping(data)


def test_repricing_recomputes_from_usage_and_failures_stay_free() -> None:
    doubled = price_table_from_mapping({"version": "x2", "extends": "2025-10-01", "models": {
        "gemini-2.5-flash-image": {"input_per_million_tokens": "0.60",
                                   "output_per_million_tokens": "60"}}})
    ok = reprice(row(), doubled)
    assert ok.cost_usd == Decimal("0.0774144") and ok.price_version == "x2"
    assert reprice(row(success=False, cost_usd=Decimal(0)), doubled).cost_usd == 0
    report = RepriceReport("x2")
    report.add(row(), ok)
    report.add(row(), ok)  # a duplicate delivery counts once
    line = report.lines()[("acme", "gemini-2.5-flash-image")]
    assert (line.operations, line.recorded_usd, line.repriced_usd, line.difference_usd) == (
        1, Decimal("0.0387072"), Decimal("0.0774144"), Decimal("0.0387072"))


def test_differences_name_the_operation_and_the_columns() -> None:
    day = date(2026, 11, 2)
    live = {"op-1": vars_of(row()), "op-2": vars_of(row("op-2"))}
    rebuilt = {"op-1": vars_of(row(cost_usd=Decimal(1))), "op-3": vars_of(row("op-3"))}
    found = [str(d) for d in diff_rows("acme", day, live, rebuilt)]
    assert any("op-2" in d and "missing from the rebuilt one" in d for d in found)
    assert any("op-3" in d and "missing from the live one" in d for d in found)
    assert any("op-1 differs: cost_usd live 0.0387072 rebuilt 1" in d for d in found)
    cells = {("acme", day): Cell(2, Decimal(1), 7)}
    assert diff_buckets(cells, dict(cells)) == []
    assert diff_buckets(cells, {}) == [
        ("acme", day, "live 2 operations $1, rebuilt 0 operations $0")]


def vars_of(r: CostRow) -> dict[str, object]:
    return {name: getattr(r, name) for name in r.__slots__}


def test_the_range_condition_selects_exactly_the_offsets_read() -> None:
    manifest = Manifest("id", "p.operations.completed", "db", None, None,
                        [Range(0, 3, 9), Range(1, 4, 4)], "as recorded")
    assert range_condition(manifest) == (
        "kafka_topic = 'p.operations.completed' AND ((kafka_partition = 0 AND "
        "kafka_offset >= 3 AND kafka_offset < 9))")
    empty = Manifest("id", "t", "db", None, None, [Range(0, 4, 4)], "as recorded")
    assert range_condition(empty) == "0"
    assert Manifest.from_json(manifest.to_json()) == manifest
