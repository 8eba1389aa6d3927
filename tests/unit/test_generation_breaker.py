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
