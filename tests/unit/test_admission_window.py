"""The sliding-log arithmetic with an injected clock, and against a reference model."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.schemas.limits import Limit, LimitError, parse_limit
from aipipe.streams.admission.limiter import MemoryRateLimitStore
from aipipe.streams.admission.window import CLIENT, MODEL, Check, SlidingLog, decide_one

MS = 1000  # microseconds


@pytest.mark.parametrize(
    ("text", "limit"),
    [("60/60s", Limit(60, 60_000)), ("500/1m", Limit(500, 60_000)), ("10/m", Limit(10, 60_000)),
     (" 5 / 250ms ", Limit(5, 250)), ("1000/1d", Limit(1000, 86_400_000))],
)
def test_limits_parse(text: str, limit: Limit) -> None:
    assert parse_limit(text, "x") == limit


def test_a_limit_prints_as_it_parses() -> None:
    assert str(Limit(60, 60_000)) == "60/1m" and str(Limit(5, 250)) == "5/250ms"


@pytest.mark.parametrize("text", ["60", "60/60", "sixty/60s", "0/60s", "5/0s", "5/60x", 60])
def test_a_malformed_limit_is_refused_naming_the_entry(text: object) -> None:
    with pytest.raises(LimitError, match=r"^Rate limit \[clients\.acme\]\.limit is .*60s"):
        parse_limit(text, "[clients.acme].limit")


class Clock:
    def __init__(self, start: int = 1_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


THREE_PER_SECOND = Limit(3, 1000)


def check(member: str, client: str = "c", model: str = "m",
          client_limit: Limit | None = THREE_PER_SECOND,
          model_limit: Limit | None = None) -> Check:
    return Check(member, f"client:{client}", client_limit, f"model:{model}", model_limit)


def test_admits_up_to_the_limit_then_says_when_to_retry() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    for n in range(3):
        assert store.decide_now([check(f"r{n}")])[0].admitted
        clock.now += 100 * MS
    refused = store.decide_now([check("r3")])[0]
    assert not refused.admitted and refused.limited_by == CLIENT
    # the first admission (at t0) leaves the 1 s window at t0 + 1 s; now is t0 + 300 ms
    assert refused.retry_after_us == 700 * MS and refused.retry_after_ms == 700
    clock.now += refused.retry_after_us - 1
    assert not store.decide_now([check("r4")])[0].admitted
    clock.now += 1
    assert store.decide_now([check("r5")])[0].admitted


def test_both_limits_must_allow_and_only_admissions_are_recorded() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    model = Limit(2, 1000)
    a1, b1, c1 = (store.decide_now([check(f"{c}1", client=c, model_limit=model)])[0]
                  for c in "abc")
    assert (a1.admitted, b1.admitted, c1.admitted) == (True, True, False)
    assert c1.limited_by == MODEL and c1.remaining == (3, 0)
    # c's refusal was not recorded against c's own window
    assert store.logs["client:c"].entries == type(store.logs["client:c"].entries)()


def test_the_later_retry_wins_when_both_are_full() -> None:
    clock = Clock()
    log_c, log_m = SlidingLog(), SlidingLog()
    c = check("x", client_limit=Limit(1, 1000), model_limit=Limit(1, 5000))
    assert decide_one([log_c, log_m], c, clock.now).admitted
    out = decide_one([log_c, log_m], check("y", client_limit=Limit(1, 1000),
                                            model_limit=Limit(1, 5000)), clock.now + 10)
    assert (out.limited_by, out.retry_after_us) == (MODEL, 5000 * MS - 10)


def test_a_duplicate_member_is_admitted_again_without_a_slot() -> None:
    store = MemoryRateLimitStore(Clock())
    first = store.decide_now([check("same")])[0]
    again = store.decide_now([check("same")])[0]
    assert first.admitted and again.admitted and again.duplicate
    assert again.remaining == (2, None)


def test_a_batch_is_decided_in_order() -> None:
    store = MemoryRateLimitStore(Clock())
    outcomes = store.decide_now([check(f"r{n}") for n in range(5)])
    assert [o.admitted for o in outcomes] == [True, True, True, False, False]
    assert asyncio.run(store.decide([])) == []


def test_the_clock_never_moves_backwards_and_idle_logs_are_swept() -> None:
    clock = Clock()
    store = MemoryRateLimitStore(clock, sweep_every=2)
    store.decide_now([check("a")])
    clock.now -= 500 * MS
    assert store.decide_now([check("b")])[0].at_us == clock.now + 500 * MS
    clock.now += 10_000 * MS
    store.decide_now([check("c", client="other")])
    store.decide_now([check("d", client="other")])
    assert "client:c" not in store.logs and "client:other" in store.logs


# -- property: the store against a reference model --------------------------------------

steps = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 3), st.integers(0, 1), st.integers(1, 4)),
    min_size=1, max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, client_count=st.integers(1, 4), model_count=st.integers(1, 6),
       window_ms=st.integers(1, 1000))
def test_in_any_window_admitted_is_at_most_the_limit(
    steps: list[tuple[int, int, int, int]], client_count: int, model_count: int, window_ms: int
) -> None:
    clock = Clock(0)
    store = MemoryRateLimitStore(clock, sweep_every=7)
    client_limit, model_limit = Limit(client_count, window_ms), Limit(model_count, window_ms)
    window = window_ms * MS
    admitted: dict[str, list[int]] = {}
    n = 0
    for dt_ms, client, model, batch in steps:
        clock.now += dt_ms * MS
        checks = []
        for _ in range(batch):
            n += 1
            checks.append(Check(f"r{n}", f"c{client}", client_limit, f"m{model}", model_limit))
        for c, outcome in zip(checks, store.decide_now(checks), strict=True):
            # the reference: count admissions still inside (now - window, now]
            live = {k: [t for t in admitted.get(k, []) if t > clock.now - window]
                    for k in (c.client_key, c.model_key)}
            full = {k: len(v) >= (client_count if k[0] == "c" else model_count)
                    for k, v in live.items()}
            assert outcome.admitted == (not any(full.values()))
            if outcome.admitted:
                for k in live:
                    admitted.setdefault(k, []).append(clock.now)
            else:
                waits = [
                    sorted(live[k])[len(live[k]) - (client_count if k[0] == "c" else model_count)]
                    + window - clock.now
                    for k in live if full[k]
                ]
                assert outcome.retry_after_us == max(waits) > 0
    for key, times in admitted.items():
        cap = client_count if key[0] == "c" else model_count
        for t in times:  # the window ending at each admission holds at most the limit
            assert sum(1 for u in times if t - window < u <= t) <= cap
