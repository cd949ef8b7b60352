"""Per-client request budgets and rate-limited log lines (pure, driven by an explicit clock)."""

from __future__ import annotations

import pytest

from transport.limits import LogThrottle, RequestBudget


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_budget_admits_a_burst_then_the_rate():
    budget = RequestBudget(rate=10.0, burst=3)

    first = [budget.admit(b"a", 0.0) for _ in range(4)]
    after_a_tenth = [budget.admit(b"a", 0.1) for _ in range(2)]  # one token refilled

    assert first == [True, True, True, False]
    assert after_a_tenth == [True, False]


def test_budget_is_kept_per_client():
    budget = RequestBudget(rate=1.0, burst=1)

    assert budget.admit(b"a", 0.0) and not budget.admit(b"a", 0.0)
    assert budget.admit(b"b", 0.0)


def test_budget_refills_to_the_burst_and_no_further():
    budget = RequestBudget(rate=100.0, burst=2)
    budget.admit(b"a", 0.0)

    admitted = [budget.admit(b"a", 60.0) for _ in range(3)]  # a minute idle: still only 2

    assert admitted == [True, True, False]


def test_budget_forgets_clients_whose_bucket_refilled():
    budget = RequestBudget(rate=10.0, burst=5)
    budget.admit(b"a", 0.0)
    budget.admit(b"b", 0.0)

    budget.admit(b"c", 10.0)  # a and b are full again by now

    assert len(budget) == 1


def test_budget_keeps_at_most_max_keys_clients():
    budget = RequestBudget(rate=0.001, burst=1, max_keys=3)

    for i in range(10):
        budget.admit(i, 0.0)

    assert len(budget) == 3
    assert budget.admit(0, 0.0)  # forgotten early: a full bucket again


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_budget_refuses_bad_limits(rate, burst):
    with pytest.raises(ValueError, match="RequestBudget"):
        RequestBudget(rate=rate, burst=burst)


def test_throttle_lets_a_few_lines_per_key_through_and_counts_the_rest():
    clock = Clock()
    throttle = LogThrottle(lines=2, interval_s=10.0, clock=clock)

    allowed = [throttle.allow("bad_header") for _ in range(5)]
    other = throttle.allow("too_large")

    assert allowed == [True, True, False, False, False]
    assert other
    assert throttle.holding()


def test_throttle_hands_out_the_held_back_count_once_the_window_ends():
    clock = Clock()
    throttle = LogThrottle(lines=1, interval_s=10.0, clock=clock)
    for _ in range(4):
        throttle.allow("bad_header")

    during = throttle.suppressed()
    clock.now += 10.0
    after = throttle.suppressed()
    again = throttle.suppressed()

    assert during == {}
    assert after == {"bad_header": 3}
    assert again == {} and not throttle.holding()


def test_throttle_opens_a_new_window_and_keeps_the_old_count():
    clock = Clock()
    throttle = LogThrottle(lines=1, interval_s=10.0, clock=clock)
    throttle.allow("k")
    throttle.allow("k")  # held back
    clock.now += 11.0

    reopened = throttle.allow("k")

    assert reopened
    assert throttle.suppressed() == {"k": 1}


def test_throttle_hands_out_open_windows_when_asked_for_everything():
    throttle = LogThrottle(lines=1, interval_s=10.0, clock=Clock())
    throttle.allow("k")
    throttle.allow("k")

    assert throttle.suppressed(everything=True) == {"k": 1}
    assert not throttle.holding()


def test_throttle_refuses_bad_limits():
    with pytest.raises(ValueError, match="LogThrottle"):
        LogThrottle(lines=0)
