"""``aipipe report``: a panel with nothing to draw says "none" instead of empty axes."""

from typing import Any

import matplotlib.pyplot as plt
import pytest

from aipipe.report import ReportData, render_html, render_png

DATA = ReportData(start="2026-11-30T00:00:00", end="2026-12-01T00:00:00",
                  days=["2026-11-30"], by_model={"veo-3.0-generate-001": {"2026-11-30": "2.4"}},
                  total_usd="2.4", operations=1)


def test_empty_panels_say_none_in_the_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda f: (figures.append(f), close(f)))
    assert render_png(DATA).startswith(b"\x89PNG")
    [figure] = figures
    panels = {ax.get_title(): ax for ax in figure.axes}
    drawn = panels.pop("Spend per day by model (USD)")
    assert drawn.axison and len(drawn.patches) == 1 and len(drawn.texts) == 0
    assert sorted(panels) == ["Rejected requests by reason", "Spend per day by client (USD)",
                              "Spend per day by operation type (USD)"]
    for title, ax in panels.items():
        assert not ax.axison and [t.get_text() for t in ax.texts] == ["none"], title
        assert len(ax.patches) == 0, title


def test_empty_tables_say_none_in_the_page() -> None:
    page = render_html(DATA, b"png")
    assert page.count("<p>none</p>") == 3
    assert "<td>2.4</td>" in page
    full = render_html(ReportData(start="a", end="b", days=["d"], by_model={"m": {"d": "1"}},
                                  by_client={"c": {"d": "1"}},
                                  by_operation_type={"image_generation": {"d": "1"}},
                                  rejections={"rate_limited": 2}), b"png")
    assert "<p>none</p>" not in full and "<td>2</td>" in full
