"""The benches' round orders: no side always runs right after the same other side."""

from collections import Counter
from itertools import pairwise

import pytest

from tests.bench.report import round_order


@pytest.mark.parametrize("names", [["on", "off"], ["on", "on, sampled", "off"]])
def test_over_two_cycles_each_side_goes_first_and_follows_each_other_equally_often(
        names: list[str]) -> None:
    rounds = [round_order(names, r) for r in range(2 * len(names))]
    assert all(sorted(order) == sorted(names) for order in rounds)
    assert Counter(order[0] for order in rounds) == {name: 2 for name in names}
    follows = Counter((a, b) for order in rounds for a, b in pairwise(order))
    # every ordered pair of sides twice (within the rounds)
    assert follows == {(a, b): 2 for a in names for b in names if a != b}


def test_three_sides_the_second_does_not_always_follow_the_first() -> None:
    names = ["on", "on, sampled", "off"]
    before_sampled = Counter(order[order.index("on, sampled") - 1]
                             for order in (round_order(names, r) for r in range(6))
                             if order[0] != "on, sampled")
    assert before_sampled == {"on": 2, "off": 2}
