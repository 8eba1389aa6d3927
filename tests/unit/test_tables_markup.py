"""Terminal tables print a client's id as it is: ``[/]`` or ``[link=…]`` is data, not rich
markup (``[/]`` raised MarkupError in `aipipe sql`, `costs summary` and `replay`)."""

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from aipipe import tables

HOSTILE = ("[/]", "[link=https://evil.example]click[/link]", "[bold")


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(tables, "console", Console(file=out, width=200))
    return out


def test_table_cells_are_text(shown: io.StringIO) -> None:
    tables.console.print(tables.table("clients", ["client", "n"],
                                      [(client, 1) for client in HOSTILE]))
    for client in HOSTILE:
        assert client in shown.getvalue()


def test_a_summary_shows_the_client_as_it_is(shown: io.StringIO) -> None:
    bucket = SimpleNamespace(count=1, cost_usd="0.5")
    tables.print_summary(SimpleNamespace(
        client_id="[/]", start=None, end=None, total_cost_usd="0.5", operation_count=1,
        success_count=1, failure_count=0, by_operation_type={"[/]": bucket},
        by_model={"m": bucket}, by_day={"d": bucket}))
    assert shown.getvalue().startswith("[/]  beginning .. now")
