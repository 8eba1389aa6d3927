"""The share of a budget the page shows (``aipipe.ui.used_percent``): rounded down, so it
reads 80.0, 90.0 or 100.0 exactly when that threshold is reached, as the row's badges and
its "within budget" / "over budget" say."""

from contextlib import nullcontext
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aipipe.consumers.costs.budgets import THRESHOLDS, thresholds_reached
from aipipe.infra.settings import Settings
from aipipe.ui import CostReader, used_percent


@pytest.mark.parametrize(("spent", "budget", "shown"), [
    ("9.9996", "10", "99.9"),  # half-to-even showed 100.0 on a row within budget
    ("79.95", "100", "79.9"),  # ... and 80.0 with no 80 % badge
    ("7.999999999", "10", "79.9"),  # a nano-dollar short
    ("89.99", "100", "89.9"),
    ("8", "10", "80.0"),  # reached exactly: shown as reached
    ("90.000000000", "100", "90.0"),
    ("10", "10", "100.0"),
    ("12.5", "10", "125.0"),
    ("0", "10", "0.0"),
    ("1", "3", "33.3"),
    ("2", "3", "66.6"),
])
def test_the_share_is_rounded_down(spent: str, budget: str, shown: str) -> None:
    share = used_percent(Decimal(spent), Decimal(budget))
    assert share is not None and format(share, "f") == shown


def test_a_zero_budget_has_no_share() -> None:
    assert used_percent(Decimal("0.5"), Decimal("0")) is None


money = st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False,
                    allow_infinity=False)


@given(spent=money, budget=money.filter(bool))
def test_the_shown_share_reaches_a_threshold_exactly_when_it_is_reached(
        spent: Decimal, budget: Decimal) -> None:
    share = used_percent(spent, budget)
    assert share is not None
    assert [t for t in THRESHOLDS if share >= t] == thresholds_reached(spent, budget)
    assert (share >= 100) == (spent >= budget)  # the row's over-budget status


class Answers:
    """A ClickHouse client that knows one budget and its period's spend."""

    def __init__(self, budget: str, spent: str) -> None:
        self.budget, self.spent = Decimal(budget), Decimal(spent)

    def query(self, sql: str, parameters: dict[str, Any]) -> SimpleNamespace:
        if "client_budgets" in sql:
            return SimpleNamespace(result_rows=[("acme", self.budget, "month")])
        return SimpleNamespace(result_rows=[(self.spent,)])


@pytest.mark.parametrize(("spent", "budget", "used", "reached", "over"), [
    ("9.9996", "10", "99.9", [80, 90], False),
    ("79.95", "100", "79.9", [], False),
    ("80", "100", "80.0", [80], False),
    ("10", "10", "100.0", [80, 90, 100], True),
])
def test_a_budget_row_agrees_with_itself(tmp_path: Path, spent: str, budget: str, used: str,
                                         reached: list[int], over: bool) -> None:
    client = Answers(budget, spent)
    reader = CostReader(lambda: nullcontext(client), "aipipe",
                        Settings(home=tmp_path, budget_usd=None))
    [row] = reader._budgets(client, None, ["acme"], datetime(2026, 12, 1, 12, tzinfo=UTC))
    assert (row["used_percent"], row["thresholds_reached"], row["over_budget"]) == (
        used, reached, over)
