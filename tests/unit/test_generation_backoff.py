"""The video poll schedule and the retry delay, as pure functions."""

import pytest

from aipipe.streams.generation.backoff import PollSchedule, retry_delay, wait_for_attempt


@pytest.mark.parametrize(
    ("attempt", "wait"),
    [(1, 2.0), (2, 3.0), (3, 4.5), (4, 6.75), (5, 10.125), (6, 15.1875), (7, 22.78125),
     (8, 30.0), (9, 30.0), (50, 30.0), (10_000, 30.0)],
)
def test_the_poll_schedule_grows_by_half_and_stops_at_the_cap(attempt: int, wait: float) -> None:
    assert wait_for_attempt(attempt) == wait


@pytest.mark.parametrize(
    ("base", "factor", "cap", "waits"),
    [
        (0.05, 1.5, 30.0, [0.05, 0.075, 0.1125, 0.16875]),
        (1.0, 2.0, 5.0, [1.0, 2.0, 4.0, 5.0, 5.0]),
        (3.0, 1.0, 30.0, [3.0, 3.0, 3.0]),
        (10.0, 1.5, 4.0, [4.0, 4.0]),
    ],
)
def test_the_schedule_follows_its_parameters(
    base: float, factor: float, cap: float, waits: list[float]
) -> None:
    got = [wait_for_attempt(n, base, factor, cap) for n in range(1, len(waits) + 1)]
    assert got == pytest.approx(waits)


def test_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        wait_for_attempt(0)


def test_a_video_is_given_up_when_the_next_wait_passes_the_maximum_total() -> None:
    schedule = PollSchedule(max_total=20.0)  # 2 + 3 + 4.5 + 6.75 = 16.25; + 10.125 > 20
    assert schedule.total_until(4) == 16.25
    assert not schedule.gives_up_before(4)
    assert schedule.gives_up_before(5)


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999])
def test_retry_delays_grow_exponentially_with_jitter_and_never_pass_the_cap(rand: float) -> None:
    delays = [retry_delay(n, base=0.5, cap=4.0, rand=lambda: rand) for n in range(1, 10)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert delays == sorted(delays)
    assert retry_delay(10_000, base=0.5, cap=4.0, rand=lambda: 0.999) <= 4.0
