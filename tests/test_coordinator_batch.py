"""Coordinator.apply: a batch of events costs one planning pass and one publish, and ends
where the same events applied one by one end (membership); its pure helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_p2p.planning import OWNER, WAITING
from nodes.coordinator import (
    DEAD,
    DONE,
    LEFT,
    LIVE,
    Coordinator,
    Event,
    MemberState,
    expected_state,
)
from tests.test_coordinator import (
    BIG,
    DIR_A,
    DIR_C,
    THREE_GROUPS,
    WEAK,
    config,
    offer,
    planted,
    swarm,
)


def _event(kind, n, spec, t):
    """The Event of one (kind, node) step of a churn list (None: not applicable)."""
    memory, direction, bw = spec[n]
    if kind == "join":
        return Event.join(n, *offer(n, memory, direction is not None, bw))
    if kind == "fingerprint":
        return None if direction is None else Event.fingerprint(n, planted(direction, n + 10 * t), 32)
    if kind == "fail":
        return Event.failure(n, n % 8 + 1)
    return {"dead": Event.dead, "left": Event.left, "done": Event.done, "alive": Event.alive}[kind](n)


def _statuses(coord, ids):
    return {n: coord.status(n) for n in ids}


# ================================================================ one event, one batch


@pytest.mark.parametrize(
    "event",
    [
        Event.dead(1),
        Event.left(4),
        Event.done(2),
        Event.join(9, *offer(9, BIG, has_data=False)),
        Event.failure(2, 1),
        Event.fingerprint(2, planted(DIR_C, 2), 32),
        Event.tick(),
    ],
    ids=lambda e: e.kind,
)
def test_a_batch_of_one_event_is_the_event_method(event):
    one, batched = swarm(THREE_GROUPS), swarm(THREE_GROUPS)

    changed = one._dispatch(event, 5.0)
    applied = batched.apply([event], now=5.0)

    assert applied.changed == changed and applied.errors == (None,)
    assert batched.metrics() == one.metrics()
    assert batched.peer_columns() == one.peer_columns()
    assert {n: batched.assignment_for(n) for n in batched.summary()} == {
        n: one.assignment_for(n) for n in one.summary()
    }


# ================================================================ bursts


def test_a_burst_of_joins_and_deaths_plans_once_and_bumps_the_version_once():
    coord, one_by_one = swarm(THREE_GROUPS), swarm(THREE_GROUPS)
    events = [Event.join(n, *offer(n, BIG, has_data=False)) for n in range(20, 60)]
    events += [Event.dead(n) for n in range(20, 60, 2)] + [Event.dead(1), Event.alive(1), Event.dead(4)]
    version = coord.version

    applied = coord.apply(events, now=5.0)
    for e in events:
        one_by_one._dispatch(e, 5.0)

    assert applied.plans <= 1  # joins are admitted into the plan; at most one full pass
    assert coord.version == version + 1 < one_by_one.version
    assert _statuses(coord, coord.summary()) == _statuses(one_by_one, one_by_one.summary())
    owners = [n for n in coord.summary() if coord.assignment_for(n)["role"] == OWNER]
    assert owners and all(coord.status(coord.assignment_for(n)["helper"]) == LIVE for n in owners)


def test_a_refused_event_gets_its_error_and_the_others_apply():
    coord = swarm(THREE_GROUPS)

    applied = coord.apply(
        [Event.dead(1), Event.fingerprint(8, planted(DIR_A, 8), 32), Event.dead(42), Event.left(5)], now=5.0
    )

    assert applied.errors[0] is None and applied.errors[3] is None
    assert "pure helper" in str(applied.errors[1]) and "unknown" in str(applied.errors[2])
    assert (coord.status(1), coord.status(5), coord.status(8)) == (DEAD, LEFT, LIVE)


def test_the_first_assignment_can_come_from_a_batch():
    coord = Coordinator(config(min_nodes=4, clusters=2))
    events = [Event.join(n, *offer(n, BIG if n % 2 else WEAK)) for n in range(1, 5)]
    events += [Event.fingerprint(n, planted(DIR_A if n < 3 else DIR_C, n), 32) for n in range(1, 5)]

    applied = coord.apply(events, now=0.0)

    assert applied.changed and applied.plans == 1 and coord.assigned and coord.version == 1
    assert {coord.assignment_for(n)["role"] for n in (2, 4)} == {OWNER}
    assert coord.assignment_for(2)["reason"].startswith("initial: ")


EVENTS = st.lists(
    st.tuples(st.sampled_from(["dead", "left", "done", "alive", "fail", "join", "fingerprint"]), st.integers(1, 8)),
    max_size=16,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=EVENTS)
def test_a_batch_ends_with_the_membership_of_one_by_one_and_a_consistent_plan(steps):
    batched, one_by_one = swarm(THREE_GROUPS), swarm(THREE_GROUPS)
    events = [e for t, (kind, n) in enumerate(steps) if (e := _event(kind, n, THREE_GROUPS, t)) is not None]
    versions = {n: batched.version_for(n) for n in THREE_GROUPS}

    applied = batched.apply(events, now=5.0)
    errors = []
    for e in events:
        try:
            one_by_one._dispatch(e, 5.0)
            errors.append(None)
        except ValueError as exc:
            errors.append(exc)

    assert [type(e) for e in applied.errors] == [type(e) for e in errors]
    assert applied.plans <= 1
    summary = batched.summary()
    assert {n: (s.status, s.fingerprinted) for n, s in summary.items()} == {
        n: (s.status, s.fingerprinted) for n, s in one_by_one.summary().items()
    } or any(e.kind == "failure" for e in events)  # a failure report depends on the plan it meets
    for n in THREE_GROUPS:
        assert batched.version_for(n) >= versions[n]
        a = batched.assignment_for(n)
        linked = [x for x in [a["helper"], a["anchor"], *a["members"], *a["serves"]] if x is not None]
        assert all(batched.status(x) == LIVE or batched.status(x) == DONE for x in linked), (n, a)
        if a["role"] == OWNER:
            assert n in batched.assignment_for(a["helper"])["serves"]
        if batched.status(n) not in (LIVE, DONE):
            assert a["role"] == WAITING


# ================================================================ what the bootstrap reads


def test_summary_has_each_members_status_data_fingerprint_and_version():
    coord = swarm(THREE_GROUPS)
    coord.on_dead(3, now=1.0)

    summary = coord.summary()

    assert summary[3] == MemberState(DEAD, True, True, coord.version_for(3))
    assert summary[8] == MemberState(LIVE, False, False, coord.version_for(8))


LIVE_DATA = MemberState(LIVE, True, False, 4)


@pytest.mark.parametrize(
    "state, event, expected",
    [
        (None, Event.join(5, *offer(5, WEAK)), MemberState(LIVE, True, False, 0)),
        (MemberState(DEAD, True, True, 4), Event.join(5, *offer(5, WEAK)), MemberState(LIVE, True, True, 4)),
        (MemberState(LEFT, True, True, 4), Event.join(5, *offer(5, BIG, False)), MemberState(LIVE, False, False, 4)),
        (MemberState(DEAD, True, True, 4), Event.alive(5), MemberState(LIVE, True, True, 4)),
        (MemberState(LEFT, True, True, 4), Event.alive(5), MemberState(LEFT, True, True, 4)),
        (LIVE_DATA, Event.dead(5), MemberState(DEAD, True, False, 4)),
        (LIVE_DATA, Event.done(5), MemberState(DONE, True, False, 4)),
        (LIVE_DATA, Event.fingerprint(5, np.ones(64), 1), MemberState(LIVE, True, True, 4)),
        (LIVE_DATA, Event.failure(5, 6), LIVE_DATA),
        (None, Event.dead(5), None),
    ],
)
def test_expected_state_follows_what_the_event_does(state, event, expected):
    assert expected_state(state, event) == expected


@pytest.mark.parametrize(
    "event, match",
    [
        (Event.fingerprint(2, np.ones(63), 32), "shape"),
        (Event.fingerprint(2, np.zeros(64), 32), "zeros"),
        (Event.fingerprint(99, planted(DIR_A, 9), 32), "unknown"),
        (Event.fingerprint(8, planted(DIR_A, 8), 32), "pure helper"),
        (Event.fingerprint(3, planted(DIR_A, 3), 32), "3 is dead"),
        (Event.fingerprint(2, planted(DIR_A, 2), 32, {"nope": 1.0}), "nope"),
        (Event.failure(2, 42), "unknown"),
        (Event.failure(2, 2), "both"),
    ],
)
def test_precheck_refuses_what_apply_refuses(event, match):
    coord = swarm(THREE_GROUPS)
    coord.on_dead(3, now=1.0)

    with pytest.raises(ValueError, match=match):
        coord.precheck(event, coord.summary())
    assert isinstance(coord.apply([event], now=2.0).errors[0], ValueError)


def test_an_event_kind_is_checked():
    with pytest.raises(ValueError, match="Event.kind"):
        Event("reboot", 1)
