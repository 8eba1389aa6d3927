"""``aipipe ui``'s API parameters and money: checked before any query, one sentence each."""

from datetime import date

import pytest

from aipipe.ui import BadParam, parse_query, usd

TODAY = date(2026, 12, 1)


def test_the_default_range_is_the_last_30_days_of_all_clients() -> None:
    q = parse_query({}, TODAY)
    assert (q.start, q.end, q.client) == (date(2026, 11, 2), TODAY, None)
    assert q.params == {"start": "2026-11-02", "end": "2026-12-02",
                        "t0": "2026-11-02 00:00:00", "t1": "2026-12-02 00:00:00"}


def test_both_days_are_included_and_the_client_is_bound_not_spliced() -> None:
    q = parse_query({"from": "2026-11-30", "to": "2026-11-30", "client": "a'; DROP"}, TODAY)
    assert q.params == {"start": "2026-11-30", "end": "2026-12-01", "client": "a'; DROP",
                        "t0": "2026-11-30 00:00:00", "t1": "2026-12-01 00:00:00"}


@pytest.mark.parametrize(("args", "sentence"), [
    ({"to": "12/01/2026"},
     "'to' must be a day as YYYY-MM-DD, such as 2026-11-01; got '12/01/2026'."),
    ({"from": "2026-12-02"},
     "'from' (2026-12-02) is after 'to' (2026-12-01); the range is from..to, both days "
     "included."),
    ({"from": "2024-01-01"},
     "The range from 2024-01-01 to 2026-12-01 is longer than 366 days; choose a shorter one."),
    ({"client": "a\nb"},
     "'client' must be a client id: 1 to 200 characters, no control characters."),
    ({"clients": "acme"}, "Unknown parameter 'clients'; use from, to, client."),
])
def test_a_bad_parameter_is_named_with_its_fix(args: dict[str, str], sentence: str) -> None:
    with pytest.raises(BadParam) as caught:
        parse_query(args, TODAY)
    assert str(caught.value) == sentence


def test_operations_need_a_client() -> None:
    with pytest.raises(BadParam, match=r"^'client' is required: the client whose operations "
                                       r"to list\.$"):
        parse_query({"from": "2026-11-01"}, TODAY, client_required=True)


def test_money_is_exact_decimal_text() -> None:
    assert [usd("0.039000000"), usd(None), usd("1E+2")] == ["0.039000000", "0", "100"]
