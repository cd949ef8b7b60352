"""Pure parts of the scenarios and the report: reading nodes' out dirs, per-cluster
aggregation, lost-update accounting and ARI, on files written through the node's records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from atlas_p2p.records import CheckpointState, ContributionRecord, Evaluation, FoldedRecord, RoundLine, Summary
from nodes.metrics import MetricsLog, write_summary
from tools import report
from tools.report import ReportError


def _node(
    root: Path,
    name: str,
    rows: list[RoundLine],
    summary: Summary | None = None,
    tail: str = "",
    state: CheckpointState | None = None,
) -> Path:
    out = root / name
    out.mkdir(parents=True)
    log = MetricsLog(out / report.METRICS_FILE)
    for row in rows:
        log.write(row)
    with log.path.open("a") as fh:
        fh.write(tail)
    if summary is not None:
        write_summary(out, summary)
    if state is not None:
        (out / report.CHECKPOINT_STATE).parent.mkdir()
        (out / report.CHECKPOINT_STATE).write_text(json.dumps(state.to_json()))
    return out


def _row(node_id, cluster, rnd, loss, made=(), folded=(), sent=None, acc=None) -> RoundLine:
    return RoundLine(
        node_id=node_id,
        cluster=cluster,
        round=rnd,
        role="owner",
        loss=loss,
        eval=None if acc is None else Evaluation("accuracy", acc, 0.0),
        steps=2,
        step_rate=1.0,
        bytes_by_kind=sent or {},
        base_version=rnd + 1,
        contributions=tuple(made),
        manifests_folded=tuple(folded),
        carried_over=False,
        repairs_seen=0,
        helper=None,
        time=0.0,
    )


def _made(*digests_by_round: str) -> tuple[ContributionRecord, ...]:
    return tuple(ContributionRecord(r, d, 4) for r, d in enumerate(digests_by_round))


def _folded(rnd: int, *nodes: int) -> FoldedRecord:
    return FoldedRecord(rnd, rnd + 1, f"p{rnd}", tuple(str(n) for n in nodes), "catch-up")


def _summary(node_id, cluster, made=(), folded=(), finished=True, adapter_dir=None) -> Summary:
    return Summary(
        node_id=node_id,
        finished=finished,
        rounds_done=len(made),
        rounds=len(made),
        cluster=cluster,
        role="owner",
        has_data=True,
        split=None,
        ranks={},
        helper=None,
        adapter_dir=adapter_dir,
        export=None,
        export_error=None,
        base_version=len(folded),
        contributions=made,
        manifests_folded=tuple(folded),
        repairs=(),
        split_mode="two-part",
        steps_served=0,
        requests_served={},
        labels_received=0,
        bytes_by_kind={},
    )


def _state(node_id, cluster, made=(), folded=()) -> CheckpointState:
    return CheckpointState(
        node_id=node_id,
        cluster=cluster,
        round=len(made),
        base_version=len(folded),
        rounds_done=len(made),
        steps_total=0,
        contributions=made,
        manifests=tuple(folded),
        repairs=(),
    )


@pytest.fixture
def swarm_dirs(tmp_path):
    """Two clusters: a,b in 0 (a is the anchor and folds both), c alone in 1 (killed: a checkpoint, no summary)."""
    folded_0 = (_folded(0, 1, 2), _folded(1, 1, 2))
    a = _node(
        tmp_path,
        "a",
        [
            _row(1, 0, 0, 2.0, made=["a0"], folded=["p0"], acc=0.25, sent={"activations": 10, "adapters": 5}),
            _row(1, 0, 1, 1.0, made=["a1"], folded=["p1"], acc=0.75, sent={"activations": 30, "adapters": 9}),
        ],
        summary=_summary(1, 0, _made("a0", "a1"), folded_0, adapter_dir="a/adapter"),
    )
    b = _node(
        tmp_path,
        "b",
        [
            _row(2, 0, 0, 3.0, made=["b0"], folded=["p0"], acc=0.25, sent={"activations": 7}),
            _row(2, 0, 1, 2.0, made=["b1"], folded=["p1"], acc=0.5, sent={"activations": 20}),
        ],
        summary=_summary(2, 0, _made("b0", "b1"), folded_0),
    )
    c = _node(
        tmp_path,
        "c",
        [
            _row(3, 1, 0, 5.0, made=["c0"], folded=["p0"], sent={"gradients": 4}),
            _row(3, 1, 1, 4.5, made=["c1"], folded=["p1"], sent={"gradients": 8}),
        ],
        state=_state(3, 1, _made("c0", "c1"), (_folded(0, 3), _folded(1, 3))),
    )
    return [a, b, c]


def test_loss_and_eval_are_averaged_per_cluster_and_round(swarm_dirs):
    runs = report.read_runs(swarm_dirs)
    assert report.loss_by_round_by_cluster(runs) == {"0": {0: 2.5, 1: 1.5}, "1": {0: 5.0, 1: 4.5}}
    assert report.eval_by_round_by_cluster(runs) == {"0": {0: 0.25, 1: 0.625}}
    assert report.eval_names(runs) == ["accuracy"]
    assert report.final_loss_by_cluster(runs) == {"0": 1.5, "1": 4.5}
    assert all(report.loss_falls(s) for s in report.loss_by_round_by_cluster(runs).values())


def test_bytes_are_the_running_totals_of_each_nodes_last_line(swarm_dirs):
    totals = report.bytes_by_kind(report.read_runs(swarm_dirs))
    assert totals == {"activations": 50, "gradients": 8, "adapters": 9, "fingerprints": 0, "control": 0}


def test_no_update_is_lost_when_every_contribution_is_in_a_folded_patch(swarm_dirs):
    runs = report.read_runs(swarm_dirs)
    assert report.contributions_made(runs) == 6
    assert report.lost_updates(runs) == []


def test_a_contribution_no_folded_patch_weighs_is_lost_and_named(tmp_path):
    a = _node(tmp_path, "a", [_row(1, 0, 0, 2.0)], summary=_summary(1, 0, _made("a0"), [_folded(0, 1)]))
    b = _node(tmp_path, "b", [_row(2, 0, 0, 2.0)], summary=_summary(2, 0, _made("b0"), [_folded(0, 1)]))
    assert report.lost_updates(report.read_runs([a, b])) == [{"digest": "b0", "node": "b", "round": 0}]


def test_a_contribution_folded_only_by_a_node_that_was_killed_later_still_counts_as_folded(tmp_path):
    # the anchor folded b0 and then died (its checkpoint, no summary); b never saw the patch itself
    anchor = _node(
        tmp_path,
        "anchor",
        [_row(1, 0, 0, 2.0)],
        tail='{"node_id": 1, "ro',
        state=_state(1, 0, _made("a0"), [_folded(0, 1, 2)]),
    )
    b = _node(tmp_path, "b", [_row(2, 0, 0, 2.0)], summary=_summary(2, 0, _made("b0")))
    runs = report.read_runs([anchor, b])
    assert report.lost_updates(runs) == []
    assert runs[0].bad_lines == 1  # the torn line left by SIGKILL is skipped, not fatal


def test_a_late_contribution_carried_into_a_merged_later_one_is_not_lost(tmp_path):
    a = _node(
        tmp_path,
        "a",
        [_row(1, 0, 0, 2.0), _row(1, 0, 1, 1.0)],
        summary=_summary(1, 0, _made("a0", "a1"), [_folded(1, 1)]),
    )  # a0 missed round 0, rode inside a1
    assert report.lost_updates(report.read_runs([a])) == []
    b = _node(
        tmp_path,
        "b",
        [_row(2, 0, 0, 2.0), _row(2, 0, 1, 1.0)],
        summary=_summary(2, 0, _made("b0", "b1"), [_folded(0, 2)]),
    )  # nothing took b1 in
    assert [x["digest"] for x in report.lost_updates(report.read_runs([b]))] == ["b1"]


def test_a_replayed_round_after_a_restart_counts_once_with_the_last_line(tmp_path):
    a = _node(
        tmp_path,
        "a",
        [
            _row(1, 0, 0, 2.0),
            _row(1, 0, 1, 9.0),  # round 1 written, then the node was killed
            _row(1, 0, 1, 1.5),
            _row(1, 0, 2, 1.0),  # restarted: round 1 again, then 2
        ],
    )
    run = report.read_node_dir(a)
    assert [row.round for row in run.rows] == [0, 1, 2]
    assert report.loss_by_round_by_cluster([run]) == {"0": {0: 2.0, 1: 1.5, 2: 1.0}}
    assert run.rounds_done == 3 and not run.finished


def test_eval_value_is_the_rounds_metric_when_it_has_a_finite_one():
    assert report.eval_value(_row(1, 0, 0, 1.0, acc=0.75)) == ("accuracy", 0.75)
    assert report.eval_value(_row(1, 0, 0, 1.0)) is None
    assert report.eval_value(replace(_row(1, 0, 0, 1.0), eval=Evaluation("perplexity", float("nan"), 1.0))) is None


def test_ari_is_one_for_a_renamed_perfect_clustering_and_penalises_unassigned_nodes():
    truth = {"a": 0, "b": 0, "c": 1, "d": 1}
    assert report.adjusted_rand(truth, {"a": 5, "b": 5, "c": 2, "d": 2}) == pytest.approx(1.0)
    assert report.adjusted_rand(truth, {"a": 0, "b": 1, "c": 0, "d": 1}) < 0.1
    assert report.adjusted_rand(truth, {"a": 5, "b": 5, "c": 2, "d": None}) < 1.0
    assert report.adjusted_rand({"a": 0}, {"a": 0}) is None


def test_ari_from_files_uses_the_summary_cluster_first(swarm_dirs, tmp_path):
    truth_path = tmp_path / "truth.json"
    truth_path.write_text(
        json.dumps({"nodes": {"a": {"task": 1}, "b": {"task": 1}, "c": {"task": 0}, "gone": {"task": 0}}})
    )
    runs = report.read_runs(swarm_dirs)
    figures = report.summarize(runs, report.load_truth(truth_path))
    assert figures["ari"] == pytest.approx(1.0)
    assert figures["lost_updates"] == 0 and figures["finished"] == ["a", "b"]


def test_unreadable_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="not a directory"):
        report.read_node_dir(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / report.SUMMARY_FILE).write_text("[1, 2]")
    with pytest.raises(ReportError, match="expected a JSON object"):
        report.read_node_dir(bad)
    (tmp_path / "truth.json").write_text("[]")
    with pytest.raises(ReportError, match="object of nodes"):
        report.load_truth(tmp_path / "truth.json")


def test_report_main_prints_tables_and_writes_json_and_plots(swarm_dirs, tmp_path, capsys):
    out = tmp_path / "fig.json"
    code = report.main([*map(str, swarm_dirs), "--json", str(out), "--plots", str(tmp_path / "plots")])
    assert code == 0
    text = capsys.readouterr().out
    assert "training loss by round" in text and "cluster 0" in text and "lost updates 0" in text
    assert json.loads(out.read_text())["final_loss_by_cluster"] == {"0": 1.5, "1": 4.5}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "loss_by_round.png").stat().st_size > 0


def test_report_main_fails_clearly_on_empty_dirs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 3
    assert "none of the directories" in capsys.readouterr().err


# --------------------------------------------------------------------------- churn scenario, pure parts

from scenarios import churn  # noqa: E402
from scenarios import victims as victims_mod  # noqa: E402
from tests.peer_rows import PEER_ROW_KEYS  # noqa: E402


def test_churn_plan_mixes_budgets_with_pure_helpers_and_one_task_per_data_node(tmp_path):
    specs = churn.plan_nodes(churn.ChurnConfig(nodes=8, tasks=2), tmp_path)
    data = [s for s in specs if s.has_data]
    helpers = [s for s in specs if not s.has_data]
    assert len(specs) == 8 and len(helpers) == 2 and all(s.data is None for s in helpers)
    assert sorted(s.task for s in data) == [0, 0, 0, 1, 1, 1]
    for task in (0, 1):  # per task: one strong node, the rest need a helper
        memories = [s.memory for s in data if s.task == task]
        assert memories.count(churn.STRONG_MEMORY) == 1 and len(set(memories)) >= 2
    assert len({s.name for s in specs}) == 8
    assert churn.pure_helper_count(5) == 0 and churn.pure_helper_count(6) == 1


def test_churn_data_files_carry_the_true_task_and_differ_between_train_and_eval(tmp_path):
    config = churn.ChurnConfig(nodes=4, tasks=2, train_examples=12, eval_examples=6)
    specs = churn.plan_nodes(config, tmp_path)
    churn.write_data(specs, config)
    for spec in specs:
        train = [json.loads(line) for line in spec.data.read_text().splitlines()]
        held = [json.loads(line) for line in spec.eval.read_text().splitlines()]
        assert len(train) == 12 and len(held) == 6
        assert {r["task"] for r in train + held} == {spec.task}
        assert [r["text"] for r in train[:6]] != [r["text"] for r in held]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(nodes=1), "nodes"),
        (dict(tasks=5), "tasks"),
        (dict(kill=1.5), "kill"),
        (dict(restart=-0.1), "restart"),
        (dict(nodes=3, tasks=3, kill=0.5), "kill"),
        (dict(kind="images"), "kind"),
        (dict(rounds=True), "rounds"),
        (dict(suspect_after=30.0), "suspect_after"),
        (dict(clusters=-1), "clusters"),
    ],
)
def test_churn_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        churn.ChurnConfig(**kwargs)


def _peer(node_id, cluster, helper=None, anchor=False, status="alive", role=None):
    """A full `peers --json` row; the role follows the plan: owner with a helper, whole with
    a cluster, helper without one (unless given)."""
    if role is None:
        role = "helper" if cluster is None else ("owner" if helper is not None else "whole")
    fields = {"id": node_id, "cluster": cluster, "helper": helper, "anchor": anchor, "status": status, "role": role}
    return {**dict.fromkeys(PEER_ROW_KEYS), **fields}


def _names(victims):
    return [v.name for v in victims]


def test_victims_are_a_serving_pure_helper_then_a_non_anchor_data_node():
    # cluster 0: 1 (anchor, whole), 2 and 3 owners served by pure helper 7 and by 1; cluster 1: 4 anchor, 5, 6 served by 8
    rows = [
        _peer(1, 0, anchor=True),
        _peer(2, 0, helper=7),
        _peer(3, 0, helper=1),
        _peer(4, 1, anchor=True),
        _peer(5, 1, helper=8),
        _peer(6, 1, helper=8),
        _peer(7, None),
        _peer(8, None),
        _peer(9, None),
    ]
    names = {i: f"n{i}" for i in range(1, 10)}
    pure = {"n7", "n8", "n9"}
    victims = victims_mod.choose_victims(rows, names, pure, 2)
    assert victims[0].name == "n8" and victims[0].serves == (5, 6)  # the pure helper serving most owners
    assert victims[0].why == "pure helper (no data), helper of n5 (id 5), n6 (id 6)"
    assert victims[1].name in {"n2", "n3"}  # n5, n6 would lose the helper just chosen; anchors never
    assert "cluster 0" in victims[1].why and "serves nobody" in victims[1].why
    assert len(victims_mod.choose_victims(rows, names, pure, 4)) == 4


def test_a_provisional_helper_is_no_serving_helper_and_no_plan_means_no_victim_rule():
    # before the plan: data rows are owners without a cluster; a waiting node names a provisional helper
    before = [
        _peer(1, None, role="owner"),
        _peer(2, None, helper=1, role="waiting"),
        _peer(3, None),
    ]
    assert not victims_mod.plan_exists(before)
    assert victims_mod.serving_helpers(before) == {}
    after = [_peer(1, 0, anchor=True), _peer(2, 0, helper=3), _peer(3, None)]
    assert victims_mod.plan_exists(after)
    assert victims_mod.serving_helpers(after) == {3: [2]}


def test_a_data_node_that_also_serves_comes_after_a_serving_pure_helper():
    # the demo's table: 1 (whole, anchor of 1) serves 4; pure helper 6 serves 2
    rows = [
        _peer(1, 1, anchor=True),
        _peer(2, 0, helper=6, anchor=True),
        _peer(3, 0, helper=5),
        _peer(4, 1, helper=1),
        _peer(5, 0),
        _peer(6, None),
    ]
    names = {1: "t1-strong0", 2: "t0-weak1", 3: "t0-weak2", 4: "t1-weak1", 5: "t0-strong0", 6: "helper0"}
    (victim,) = victims_mod.choose_victims(rows, names, {"helper0"}, 1)
    assert victim.name == "helper0" and victim.serves == (2,)
    # with the pure helper not eligible, the next serving helper is a data node, and the reason says so
    (victim,) = victims_mod.choose_victims(rows, names, {"helper0"}, 1, eligible={1, 3, 4, 5})
    assert victim.name == "t0-strong0"
    assert (
        victim.why == "data node, role whole, cluster 0, 2 other live members in its cluster, helper of t0-weak2 (id 3)"
    )


def test_victims_never_empty_a_cluster_or_pick_dead_nodes():
    rows = [
        _peer(1, 0, anchor=True),
        _peer(2, 0, helper=5),
        _peer(3, 1, anchor=True),
        _peer(4, 1, status="dead"),
        _peer(5, None),
    ]
    names = {i: f"n{i}" for i in range(1, 6)}
    victims = victims_mod.choose_victims(rows, names, {"n5"}, 3)
    assert _names(victims) == ["n5", "n2"]  # nothing else can go without emptying a cluster
    assert victims_mod.serving_helpers(rows) == {5: [2]}


def _event(owner, old, new, kind="repair", cause="failed"):
    return {
        "time": 1.0,
        "owner": owner,
        "old_helper": old,
        "new_helper": new,
        "kind": kind,
        "cause": cause,
        "cluster": 0,
    }


def test_kill_outcomes_take_only_the_victims_repairs_after_a_kill():
    victims = [
        victims_mod.Victim("h", 6, (2, 3), "pure helper"),
        victims_mod.Victim("d", 4, (), "data node"),
    ]
    events = [
        _event(2, 6, 5),
        _event(3, 6, None, kind="unpaired", cause="dead"),
        _event(7, 9, 5),  # another helper
        _event(8, 6, 5, cause="done"),  # not what a kill causes
    ]
    helper, data = victims_mod.kill_outcomes(victims, events, {2: [6], 7: [9]})
    assert helper["repaired"] == [events[0]] and helper["unpaired"] == [3] and helper["reported_by"] == [2]
    assert (data["served"], data["repaired"], data["unpaired"], data["reported_by"]) == ([], [], [], [])
    names = {2: "a", 3: "b", 4: "d", 5: "s", 6: "h"}
    text = victims_mod.describe_outcome(helper, names)
    assert "h (id 6) died serving a (id 2), b (id 3)" in text
    assert "re-paired a -> s (id 5, repair, cause failed)" in text and "b (id 3) found no new helper" in text
    assert victims_mod.short_claim(helper, names) == "h (helper of a, b) died and a was re-paired (repairs 1)"
    assert victims_mod.describe_outcome(data, names).endswith("it served no owner, so there was nothing to repair")
    assert victims_mod.short_claim(data, names) == "d died serving nobody (no repair needed)"


def test_a_helper_killed_without_a_repair_event_is_never_claimed_repaired():
    (outcome,) = victims_mod.kill_outcomes([victims_mod.Victim("h", 6, (2,), "pure helper")], [_event(2, 9, 5)], {})
    assert outcome["repaired"] == []
    assert "the bootstrap recorded no repair of its owners" in victims_mod.describe_outcome(outcome, {})
    assert "none of its owners was re-paired" in victims_mod.short_claim(outcome, {})


def _result(**changes):
    base = dict(
        survivors=["a", "b"],
        finished=["a", "b"],
        restarted=[],
        data_nodes=["a", "b", "c"],
        killed=["h", "c"],
        exit_codes={"a": 0, "b": 0, "c": None},
        killed_for_good=["c"],
        lost_updates=0,
        contributions=8,
        node_ids={"a": 1, "b": 2, "c": 3, "h": 4, "s": 5},
        kills=[_kill("h", 4, served=[1], repaired=[_event(1, 4, 5)]), _kill("c", 3)],
        repairs=1,
        ari=1.0,
        loss_by_round_by_cluster={"0": {"0": 2.0, "3": 1.0}, "1": {"0": 2.0, "3": 1.5}},
    )
    return {**base, **changes}


def _kill(name, node_id, served=(), repaired=()):
    return dict(
        name=name, id=node_id, why="", served=list(served), repaired=list(repaired), unpaired=[], reported_by=[]
    )


def test_acceptance_passes_a_good_run_and_names_each_failed_check():
    assert churn.acceptance_failures(_result()) == []
    bad = churn.acceptance_failures(
        _result(
            finished=["a"],
            lost_updates=2,
            kills=[_kill("h", 4, served=[1])],
            ari=0.5,
            exit_codes={"a": 0, "b": 1, "c": None},
            loss_by_round_by_cluster={"0": {"0": 2.0, "3": 2.5}},
        )
    )
    text = "\n".join(bad)
    assert len(bad) == 6
    for needle in (
        "did not finish every round: b",
        "exited with an error",
        "lost_updates = 2",
        "h was killed serving owners [1] but the bootstrap recorded no repair of them (repairs in all = 1)",
        "ari = 0.5",
        "cluster 0: loss did not fall",
    ):
        assert needle in text
    assert churn.acceptance_failures(_result(kills=[_kill("c", 3)], repairs=0)) == []
    both_killed = [_kill("h", 4, served=[3]), _kill("c", 3)]  # its only owner died with it: nothing to repair
    assert churn.acceptance_failures(_result(kills=both_killed, repairs=0)) == []
    assert "ari = None" in "\n".join(churn.acceptance_failures(_result(ari=None)))


def test_closing_claims_say_what_the_figures_show():
    claims = churn.closing_claims(_result())
    assert claims == [
        "2/2 surviving data nodes finished every round",
        "0 of 8 contributions lost",
        "h (helper of a) died and a was re-paired (repairs 1)",
        "c died serving nobody (no repair needed)",
        "clusters match the tasks (ARI 1.0)",
        "loss fell in every cluster",
    ]
    assert "nobody was killed" in churn.closing_claims(_result(kills=[]))
    assert churn.kill_lines(_result())[0] == (
        "h (id 4) died serving a (id 1); the bootstrap re-paired a -> s (id 5, repair, cause failed)"
    )


def test_bytes_of_a_restarted_node_add_up_over_its_incarnations(tmp_path):
    a = _node(
        tmp_path,
        "a",
        [
            _row(1, 0, 0, 2.0, sent={"activations": 10}),
            _row(1, 0, 1, 2.0, sent={"activations": 25}),
            _row(1, 0, 1, 2.0, sent={"activations": 4}),
            _row(1, 0, 2, 2.0, sent={"activations": 9}),  # restarted
        ],
    )
    assert report.bytes_by_kind(report.read_runs([a]))["activations"] == 25 + 9


def test_victims_come_only_from_the_eligible_nodes_and_a_kill_shortfall_is_a_failure():
    rows = [
        _peer(1, 0, anchor=True),
        _peer(2, 0, helper=7),
        _peer(3, 1, anchor=True),
        _peer(4, 1, helper=8),
        _peer(5, 1),
        _peer(7, None),
        _peer(8, None),
    ]
    names = {i: f"n{i}" for i in (1, 2, 3, 4, 5, 7, 8)}
    assert _names(victims_mod.choose_victims(rows, names, {"n7", "n8"}, 2, eligible={8, 5})) == ["n8", "n5"]
    assert victims_mod.choose_victims(rows, names, {"n7", "n8"}, 2, eligible=set()) == []
    failures = churn.acceptance_failures(_result(killed=["h"], kill_requested=2))
    assert failures == ["only 1 of 2 nodes could be killed mid-training (training ended first?)"]


def test_atlas_node_report_reads_out_dirs(swarm_dirs, capsys):
    from tools.cli import main

    args = ["report"] + [arg for d in swarm_dirs for arg in ("--out", str(d))]
    assert main(args) == 0
    assert "lost updates 0" in capsys.readouterr().out
    assert main(["report", "--out", str(swarm_dirs[0].parent / "missing")]) == 3


def test_final_loss_is_the_clusters_last_round_not_a_killed_nodes_old_loss(tmp_path):
    a = _node(tmp_path, "a", [_row(1, 0, 0, 2.0), _row(1, 0, 1, 1.0), _row(1, 0, 2, 0.5)])
    killed = _node(tmp_path, "killed", [_row(2, 0, 0, 2.2)])
    assert report.final_loss_by_cluster(report.read_runs([a, killed])) == {"0": 0.5}
