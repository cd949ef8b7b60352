"""The in-process churn engine (scenarios/simulate.py): its pure parts (timings, the repair
predicate, the kill rule's waiting cases) without sockets, and one real run: 50 virtual
nodes on two worker processes, 30% of them killed mid-training."""

import asyncio

from scenarios import simulate
from scenarios.churn import midway_victims, repair_visible
from tests.peer_rows import PEER_ROW_KEYS


def _row(node_id, cluster, helper=None, anchor=False, status="alive", role=None):
    if role is None:
        role = "helper" if cluster is None else ("owner" if helper is not None else "whole")
    fields = {"id": node_id, "cluster": cluster, "helper": helper, "anchor": anchor, "status": status, "role": role}
    return {**dict.fromkeys(PEER_ROW_KEYS), **fields}


def test_timings_keep_the_heartbeat_load_flat_as_nodes_grow():
    small, large = simulate.scaled_timing(50), simulate.scaled_timing(1000)
    assert small.heartbeat_s == 1.0 and large.heartbeat_s == 5.0
    assert 1000 / large.heartbeat_s == simulate.HEARTBEATS_PER_S
    for t in (small, large):
        assert t.heartbeat_s < t.suspect_after < t.dead_after and t.dead_after >= 15.0
        assert t.round_deadline == t.dead_after + 4 * t.step_timeout
    assert large.step_timeout == 50.0 and small.step_timeout == 5.0
    assert small.poll_s == 0.1 and large.poll_s == 2.0
    config = simulate.simulate_config(50, 4, 0.3, rounds=3)
    assert (config.heartbeat_s, config.dead_after, config.step_timeout, config.rounds) == (1.0, 15.0, 5.0, 3)


def test_the_repair_shows_once_victims_are_gone_and_nobody_names_them():
    rows = [_row(1, 0, anchor=True), _row(2, 0, helper=7), _row(7, None, status="dead")]
    assert not repair_visible(rows, [7])  # 2 still names the dead helper
    rows[1] = _row(2, 0, helper=8)
    assert repair_visible(rows, [7])
    assert not repair_visible([_row(7, None)], [7])  # still alive


def test_no_victim_before_the_plan_or_before_a_helpers_owners_finished_a_round():
    names = {1: "a", 2: "b", 7: "h"}
    planned = [_row(1, 0, anchor=True), _row(2, 0, helper=7), _row(7, None)]
    unplanned = [_row(1, None, role="owner"), _row(7, None)]
    assert midway_victims(unplanned, names, {"h"}, 1, lambda i: 1, 4) is None
    assert midway_victims(planned, names, {"h"}, 1, lambda i: 0, 4) is None  # owner 2 has done no round
    (victim,) = midway_victims(planned, names, {"h"}, 1, lambda i: 1, 4)
    assert victim.name == "h" and victim.serves == (2,)


def test_fifty_virtual_nodes_on_two_workers_survive_a_thirty_percent_kill(tmp_path):
    config = simulate.simulate_config(50, 4, 0.3, rounds=3, local_steps=2, timeout_s=900.0)
    lines = []
    result = asyncio.run(simulate.SimulateRun(config, tmp_path, say=lines.append, workers=2).run())

    assert simulate.simulate_failures(result) == [], "\n".join(lines[-40:])
    assert len(result["killed"]) == 15 and len(result["kills"]) == 15
    assert sorted(result["finished"]) == sorted(result["survivors"]) and len(result["survivors"]) >= 20
    assert result["lost_updates"] == 0 and result["ari"] >= 0.9 and result["repairs"] >= 1
    assert result["workers"] == 2 and result["workers_peak_rss_mb"] > 0 and result["peak_rss_mb"] > 0
