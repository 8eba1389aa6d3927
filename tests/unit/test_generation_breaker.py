"""Circuit-breaker transitions: closed, open, half-open, closed, as pure functions."""

from aipipe.streams.generation.breaker import (
    CLOSED,
    TRIAL_MEMORY,
    BreakerPolicy,
    BreakerState,
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
    closed = on_success(trial, 6.2, "acme")
    assert (closed.status, closed.failures, closed.trial_in_flight) == ("closed", (), False)
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
    served = on_success(state, 1.0, "acme")
    assert (served.status, served.failures, served.served) == ("closed", (0.0,),
                                                               (("acme", 1.0),))


def test_one_client_alone_cannot_open_it_while_another_is_served() -> None:
    """threshold 3, so a client counts at most 2 while another client is served after its
    first failure."""
    state = on_failure(CLOSED, POLICY, 1.0, "hostile")
    state = on_success(state, 1.05, "steady")
    for now in (1.1, 1.2, 1.3, 1.4, 1.5):
        state = on_failure(state, POLICY, now, "hostile")
        assert state.status == "closed"
    # a client's failures past the threshold are not kept, but its first in the window is
    assert (state.failures, state.sources) == ((1.0, 1.4, 1.5), ("hostile",) * 3)
    state = on_failure(state, POLICY, 2.0, "steady")  # a second client fails too: 2 + 1
    assert (state.status, state.opened_at) == ("open", 2.0)


def test_a_success_from_before_a_clients_first_failure_does_not_cap_it() -> None:
    """The provider went down after the last success: only one client still sends, and its
    failures open the circuit at the threshold, as without other clients."""
    state = on_success(CLOSED, 0.0, "other")
    for now in (0.1, 0.2):
        state = on_failure(state, POLICY, now, "only")
        assert state.status == "closed"
    assert on_failure(state, POLICY, 0.3, "only").status == "open"


def test_every_failure_counts_when_no_other_client_was_served_within_the_window() -> None:
    stale = on_success(CLOSED, 0.0, "steady")  # served, but longer ago than the window
    own = on_success(CLOSED, 10.5, "hostile")  # only the failing client itself served
    for state in (stale, own, CLOSED):
        for now in (11.0, 11.1):
            state = on_failure(state, POLICY, now, "hostile")
        state = on_failure(state, POLICY, 11.2, "hostile")
        assert (state.status, state.opened_at) == ("open", 11.2)


def test_the_two_clients_served_last_are_remembered() -> None:
    state = CLOSED
    for now, client in ((0.0, "a"), (0.5, "a"), (2.0, "b"), (3.0, "c"), (4.0, "b")):
        state = on_success(state, now, client)
    assert state.served == (("b", 4.0), ("c", 3.0))
    assert on_success(state, 4.5, "b") is state  # the same client within a second: unchanged


def test_a_configured_share_replaces_the_default() -> None:
    strict = BreakerPolicy(threshold=3, window=10.0, cooldown=5.0, client_share=1)
    state = on_failure(CLOSED, strict, 1.0, "hostile")
    state = on_success(state, 1.05, "steady")
    for now in (1.1, 1.2):
        state = on_failure(state, strict, now, "hostile")
    state = on_failure(state, strict, 1.3, "other")
    assert state.status == "closed"  # 1 + 1 of 3: "other" failed after the last success
    assert on_failure(state, strict, 1.4, "other").status == "open"  # 1 + 2


def _opened_at(now: float) -> BreakerState:
    state = CLOSED
    for _ in range(3):
        state = on_failure(state, POLICY, now, "")
    return state


def test_a_client_whose_trial_failed_waits_a_second_cooldown_another_client_tries_first() -> None:
    """cool-down 5: opened at 0, hostile's trial at 5 fails (reopened at 5.5); hostile may
    not take the trial again before 15.5, another client may from 10.5."""
    opened = _opened_at(0.0)
    allowed, trial = before_call(opened, POLICY, 5.0, "hostile")
    assert allowed and trial.status == "half_open"
    reopened = on_failure(trial, POLICY, 5.5, "hostile")
    assert (reopened.status, reopened.opened_at, reopened.failed_trials) == (
        "open", 5.5, ("hostile",))
    assert not before_call(reopened, POLICY, 10.6, "hostile")[0]
    assert not before_call(reopened, POLICY, 15.4, "hostile")[0]
    allowed, steady_trial = before_call(reopened, POLICY, 10.6, "steady")
    assert allowed and steady_trial.status == "half_open"
    assert not before_call(steady_trial, POLICY, 10.7, "hostile")[0]  # one trial at a time
    closed = on_success(steady_trial, 10.8, "steady")
    assert (closed.status, closed.failed_trials) == ("closed", ())
    assert before_call(closed, POLICY, 10.9, "hostile")[0]  # closed: everyone goes through
    # no one else came: hostile takes the trial after the second cool-down
    assert before_call(reopened, POLICY, 15.6, "hostile")[0]


def test_while_half_open_a_barred_client_does_not_take_a_released_trial() -> None:
    opened = _opened_at(0.0)
    _, trial = before_call(opened, POLICY, 5.0, "hostile")
    reopened = on_failure(trial, POLICY, 5.0, "hostile")
    _, trial = before_call(reopened, POLICY, 10.0, "steady")
    freed = on_neutral(trial)  # steady's call said nothing about the provider
    assert not before_call(freed, POLICY, 10.1, "hostile")[0]
    assert before_call(freed, POLICY, 10.1, "other")[0]


def test_each_failed_trial_is_remembered_up_to_the_bound_and_calls_without_a_client_never_wait(
) -> None:
    state = _opened_at(0.0)
    now = 0.0
    for i in range(TRIAL_MEMORY + 2):
        now += 2 * POLICY.cooldown
        allowed, state = before_call(state, POLICY, now, f"c{i}")
        assert allowed
        state = on_failure(state, POLICY, now, f"c{i}")
    assert state.failed_trials == tuple(f"c{i}" for i in range(2, TRIAL_MEMORY + 2))
    _, trial = before_call(state, POLICY, now + POLICY.cooldown, "")
    assert trial.status == "half_open"  # no client named: it cannot be told apart
    assert on_failure(trial, POLICY, now + 6, "").failed_trials == state.failed_trials
