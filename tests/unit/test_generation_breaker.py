"""Circuit-breaker transitions: closed, open, half-open, closed, as pure functions."""

from aipipe.streams.generation.breaker import (
    CLOSED,
    BreakerPolicy,
    before_call,
    on_failure,
    on_neutral,
    on_success,
)

POLICY = BreakerPolicy(threshold=3, window=10.0, cooldown=5.0)


def test_it_opens_after_the_threshold_of_failures_within_the_window() -> None:
    state = CLOSED
    for now in (0.0, 1.0):
        state = on_failure(state, POLICY, now)
        assert state.status == "closed"
    state = on_failure(state, POLICY, 2.0)
    assert (state.status, state.opened_at) == ("open", 2.0)


def test_failures_older_than_the_window_do_not_count() -> None:
    state = CLOSED
    for now in (0.0, 1.0, 11.5, 12.0):
        state = on_failure(state, POLICY, now)
    assert state.status == "closed" and state.failures == (11.5, 12.0)


def test_while_open_calls_fail_fast_until_the_cooldown_then_one_trial_goes_through() -> None:
    state = CLOSED
    for now in (0.0, 0.1, 0.2):
        state = on_failure(state, POLICY, now)
    allowed, state = before_call(state, POLICY, 5.1)
    assert not allowed and state.status == "open"
    allowed, state = before_call(state, POLICY, 5.2)
    assert allowed and state.status == "half_open"
    allowed, again = before_call(state, POLICY, 5.3)
    assert not allowed and again == state  # one trial at a time


def test_a_successful_trial_closes_and_a_failed_one_reopens() -> None:
    opened = on_failure(on_failure(on_failure(CLOSED, POLICY, 0), POLICY, 0), POLICY, 0)
    _, trial = before_call(opened, POLICY, 6.0)
    assert on_success(trial) == CLOSED
    reopened = on_failure(trial, POLICY, 6.5)
    assert (reopened.status, reopened.opened_at) == ("open", 6.5)
    assert not before_call(reopened, POLICY, 10.0)[0]
    assert before_call(reopened, POLICY, 11.5)[0]


def test_a_permanent_error_in_the_trial_frees_the_trial_without_closing() -> None:
    opened = on_failure(on_failure(on_failure(CLOSED, POLICY, 0), POLICY, 0), POLICY, 0)
    _, trial = before_call(opened, POLICY, 6.0)
    freed = on_neutral(trial)
    assert freed.status == "half_open" and before_call(freed, POLICY, 6.1)[0]


def test_success_while_closed_keeps_the_recent_failures() -> None:
    state = on_failure(CLOSED, POLICY, 0.0)
    assert on_success(state) == state
