"""The side-by-side evaluation: partitions and scores as pure functions, then every method of
setting (a) end to end through `scenarios/evaluate.py` on the embedded tiny model."""

import argparse
import dataclasses
import json
from collections import Counter

import pytest

from scenarios import evaluate
from scenarios.evaluation import scoring
from scenarios.evaluation.methods import METHODS, parse_methods
from scenarios.evaluation.population import build_population, partition_task, pooled, write_rows


def _rows(n, labels=4, task="t"):
    return [{"text": " ".join(["w"] * (1 + i % 9)), "label": i % labels, "task": task} for i in range(n)]


def test_the_task_partition_gives_disjoint_equal_slices_and_weakens_the_first_node():
    nodes = build_population({"a": _rows(40, task="a"), "b": _rows(40, task="b")}, 3, 10, "task", 0.5, seed=1)

    assert [n.name for n in nodes] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert [n.weak for n in nodes] == [True, False, False, True, False, False]
    assert all(len(n.rows) == 10 for n in nodes)
    a_rows = [id(r) for n in nodes if n.task == "a" for r in n.rows]
    assert len(set(a_rows)) == 30


def test_the_dirichlet_partition_skews_labels_and_the_length_one_skews_lengths():
    rows = _rows(400)
    label_parts = partition_task(rows, 4, 100, "dirichlet", 0.1, seed=0)
    length_parts = partition_task(rows, 4, 100, "length", 0.1, seed=0)

    assert sum(map(len, label_parts)) == sum(map(len, length_parts)) == 400
    top_label_share = [max(Counter(r["label"] for r in p).values()) / len(p) for p in label_parts if p]
    assert max(top_label_share) > 0.6  # uniform would be 0.25
    mean_lengths = [sum(len(r["text"].split()) for r in p) / len(p) for p in length_parts if p]
    assert max(mean_lengths) - min(mean_lengths) > 1.5


def test_a_partition_asking_for_more_rows_than_a_task_has_is_one_clear_error():
    with pytest.raises(ValueError, match="need 50 rows; the task has 40"):
        partition_task(_rows(40), 5, 10, "task", 0.5, 0)
    with pytest.raises(ValueError, match="partition 'x'"):
        partition_task(_rows(40), 2, 10, "x", 0.5, 0)


def test_pooled_methods_see_the_same_rows_and_node_files_carry_no_task(tmp_path):
    nodes = build_population({"a": _rows(20, task="a"), "b": _rows(20, task="b")}, 2, 10, "task", 0.5, seed=0)

    (everything,) = pooled(nodes, "pooled")
    per_task = pooled(nodes, "per-task")

    assert sorted(map(id, everything.rows)) == sorted(id(r) for n in nodes for r in n.rows)
    assert [(n.name, n.task, len(n.rows)) for n in per_task] == [("a-pooled", "a", 20), ("b-pooled", "b", 20)]
    assert not any(n.weak for n in per_task)
    path = write_rows(tmp_path / "a.jsonl", nodes[0].rows)
    assert all(set(json.loads(line)) == {"text", "label"} for line in path.read_text().splitlines())


def test_the_target_is_the_first_round_that_reaches_it():
    curve = {0: 0.4, 1: 0.7, 2: 0.9}
    ends = {0: 10.0, 1: 20.0, 2: 30.0}

    assert scoring.to_target(curve, ends, 0.7) == (2, 20.0)
    assert scoring.to_target(curve, ends, 0.95) == (None, None)
    assert scoring.to_target({0: 30.0, 1: 12.0}, ends, 15.0, higher_is_better=False) == (2, 20.0)
    assert scoring.per_task({"x": {"a": 0.5}, "y": {"a": 1.0, "b": 0.2}}) == {"a": 0.75, "b": 0.2}


def test_the_held_out_rows_are_a_seeded_sample_not_the_head_of_a_sorted_file(tmp_path):
    """Test files may be sorted by label; scoring on their first rows would score one class."""
    for task in evaluate.REAL_TEXT_TASKS:
        for split in ("train", "test"):
            rows = sorted(_rows(400, task=task), key=lambda r: r["label"])
            write_rows(tmp_path / f"{task}.{split}.jsonl", rows)
    setting = evaluate.SETTINGS["b2"]

    _, held = evaluate.load_tasks(setting, tmp_path)
    again = evaluate.load_tasks(setting, tmp_path)[1]

    for task, rows in held.items():
        assert len(rows) == setting.eval_per_task
        assert set(Counter(r["label"] for r in rows)) == {0, 1, 2, 3}, task
        assert rows == again[task]


def test_validation_rows_come_from_training_rows_no_node_holds(tmp_path):
    """--eval-split validation: learning rates are chosen without looking at the test rows."""
    for task in evaluate.REAL_TEXT_TASKS:
        write_rows(tmp_path / f"{task}.train.jsonl", [{**r, "text": f"{task} {i}"} for i, r in enumerate(_rows(60))])
        write_rows(tmp_path / f"{task}.test.jsonl", [{**r, "text": f"test {i}"} for i, r in enumerate(_rows(60))])
    setting = evaluate.SETTINGS["b2"]
    small = dataclasses.replace(setting, nodes_per_task=4, per_node=10, eval_per_task=20, eval_split="validation")

    train, held = evaluate.load_tasks(small, tmp_path)
    nodes = build_population(train, 4, 10, "task", 0.5, small.seed)

    for task in train:
        held_texts = {r["text"] for r in held[task]}
        assert len(held_texts) == 20 and all(t.startswith(task) for t in held_texts)
        assert not held_texts & {r["text"] for n in nodes if n.task == task for r in n.rows}
    with pytest.raises(ValueError, match="wn_pos has 60 training rows, the nodes and the validation rows need 61"):
        evaluate.load_tasks(dataclasses.replace(small, eval_per_task=21), tmp_path)


def test_learning_rates_are_one_for_all_or_per_method():
    def setting(*flags):
        parser = argparse.ArgumentParser()
        parser.add_argument("--setting", default="b2")
        parser.add_argument("--lr", type=evaluate.parse_lr)
        return evaluate.resolve(parser.parse_args(list(flags)))

    assert setting().lr_of("atlas") == evaluate.SETTINGS["b2"].lr_of("atlas")
    both = setting("--lr", "2e-3,atlas=5e-3")
    assert (both.lr_of("atlas"), both.lr_of("local"), both.lr_of("per-task")) == (5e-3, 2e-3, 2e-3)
    assert setting("--lr", "local=4e-3").lr_of("local") == 4e-3
    assert setting("--lr", "1e-4").method_lr == ()  # one rate for every method
    for bad in ("0", "atlas=-1", "nope=1e-3", "fast", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            evaluate.parse_lr(bad)


def test_unknown_methods_are_named():
    assert [m.name for m in parse_methods("atlas, local")] == ["atlas", "local"]
    assert len(parse_methods("all")) == len(METHODS)
    with pytest.raises(ValueError, match="unknown method.*nope"):
        parse_methods("atlas,nope")


def _folded_digests(run_dir, *names):
    """The distinct sequences of patch digests the named nodes folded."""
    folded = (json.loads((run_dir / n / "summary.json").read_text())["manifests_folded"] for n in names)
    return {tuple(f["digest"] for f in records) for records in folded}


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--model", "/no/such/model"], "cannot load model"),
        (["--per-node", "0"], "per_node"),
        (["--rounds", "-1"], "rounds"),
        (["--partition", "dirichlet", "--alpha", "0"], "alpha"),
        (["--setting", "c", "--partition", "dirichlet"], "causal_lm settings"),  # no labels to skew
        (["--methods", "atlas,nope"], None),  # argparse: usage error, exit 2
        (["--lr", "atlas=0"], None),
        (["--eval-split", "validation"], "synthetic tasks draw fresh held-out rows"),
        (["--setting", "b2", "--tasks", "5"], "the real text has 4 tasks"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, says):
    out = tmp_path / "out"
    try:
        code = evaluate.main(["--setting", "a", "--out", str(out), *flags])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and not out.exists()
    if says:
        assert says in capsys.readouterr().out


@pytest.mark.timeout(900)
def test_every_method_of_setting_a_runs_and_the_table_is_sane(tmp_path):
    assert evaluate.main(["--setting", "a", "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    methods = results["methods"]
    assert list(methods) == list(METHODS)
    for name, m in methods.items():
        assert m["finished"] == m["nodes"], name
        assert m["lost_updates"] == 0, name
        assert set(m["per_task"]) == set(results["tasks"]), name
        assert 0.0 <= m["mean_accuracy"] <= 1.0 and m["wall_s"] > 0, name
        assert m["curve"] and m["bytes_per_node_mb"] is not None, name
    assert methods["atlas"]["ari"] == 1.0 and methods["atlas"]["k"] == len(results["tasks"])
    assert methods["mira"]["ari"] == 1.0
    assert set(methods["mira"]["roles"].values()) == {"whole"}  # MIRA has no split
    assert set(methods["splitlora"]["roles"].values()) == {"owner"}  # one cut for everyone
    # ATLAS's cluster members fold one shared patch a round; MIRA's fold personal ones
    assert len(_folded_digests(tmp_path / "runs" / "atlas", "task0-0", "task0-1")) == 1
    assert len(_folded_digests(tmp_path / "runs" / "mira", "task0-0", "task0-1")) == 2
    assert methods["local"]["k"] == methods["local"]["nodes"]  # nobody merges with anybody
    assert methods["hsplitlora"]["k"] == methods["taskblind"]["k"] == methods["splitlora"]["k"] == 1
    # the synthetic tasks conflict: one adapter for all of them cannot serve them all
    for blind in ("centralized", "splitlora", "hsplitlora", "taskblind"):
        assert methods["atlas"]["mean_accuracy"] > methods[blind]["mean_accuracy"] + 0.15, blind
    assert methods["per-task"]["mean_accuracy"] > methods["centralized"]["mean_accuracy"] + 0.15
    assert (
        methods["taskblind"]["bytes_per_node_mb"]["adapters"] > methods["hsplitlora"]["bytes_per_node_mb"]["adapters"]
    )
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert all((tmp_path / f"{p}.png").stat().st_size > 0 for p in ("curve", "bytes", "time"))


@pytest.mark.timeout(600)
def test_the_language_modelling_setting_runs_its_methods_and_scores_perplexity(tmp_path):
    """Setting (c)'s path (text read as language modelling, perplexity, lower is better) on the
    embedded tiny-gpt2 and a folder laid out as ../shared/data (synthetic text, labels dropped)."""
    from atlas_p2p.synthetic import write_synthetic_jsonl
    from scenarios.textdata import REAL_TEXT_TASKS

    data = tmp_path / "data"
    for t, name in enumerate(REAL_TEXT_TASKS):
        for split, n, seed in (("train", 40, t), ("test", 16, 100 + t)):
            write_synthetic_jsonl(data / f"{name}.{split}.jsonl", t, n, kind="classification", seed=seed)
    out = tmp_path / "out"
    flags = ["--per-node", "20", "--eval-per-task", "8", "--curve-rows", "4", "--rounds", "1", "--local-steps", "2"]
    flags += ["--lr", "1e-3,atlas=2e-3"]
    base = ["--setting", "c", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), *flags]
    assert evaluate.main([*base, "--methods", "per-task"]) == 0
    first = json.loads((out / "results.json").read_text())["methods"]["per-task"]
    # stopped and taken up again: per-task is kept (not asked for again), atlas runs
    code = evaluate.main([*base, "--methods", "atlas", "--resume"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "perplexity" and results["complete"]
    for name in ("per-task", "atlas"):
        m = results["methods"][name]
        assert m["finished"] == m["nodes"] and m["lost_updates"] == 0
        assert set(m["per_task"]) == set(REAL_TEXT_TASKS) and all(1 < v < 1e6 for v in m["per_task"].values())
        assert m["mean_perplexity"] is not None
    node_file = next((out / "runs" / "atlas" / "data").glob("*.jsonl")).read_text().splitlines()[0]
    assert set(json.loads(node_file)) == {"text"}  # no label, no task
    assert results["methods"]["per-task"] == first
    assert (results["methods"]["per-task"]["lr"], results["methods"]["atlas"]["lr"]) == (1e-3, 2e-3)
    before = (out / "results.json").read_bytes()
    assert evaluate.main([*base, "--methods", "per-task,atlas", "--resume", "--rounds", "2"]) == 2  # another setting
    assert (out / "results.json").read_bytes() == before
    table, curve = (out / "eval" / "wn_pos.jsonl").read_text(), (out / "eval" / "wn_pos.curve.jsonl").read_text()
    assert len(table.splitlines()) == 8 and curve.splitlines() == table.splitlines()[:4]  # the curve's rows


@pytest.mark.parametrize("owners", [8, 32])
def test_splitlora_s_server_has_room_for_every_client_and_no_more(owners):
    """SplitLoRA's one server (Method.server): sized by the planner's own footprints so that the
    plan pairs every client with it; one client fewer of room leaves a client waiting."""
    from atlas_p2p.capabilities import Capabilities
    from atlas_p2p.memory import Workload, shape_from_config
    from atlas_p2p.planning import OWNER, WAITING, NodeInfo, PlanConfig, PlanContext, make_plan
    from nodes.modelname import model_config
    from scenarios.budgets import WEAK_MARGIN, server_budget
    from scenarios.evaluation.methods import SPLITLORA_RANK, SPLITLORA_SPLIT

    s = evaluate.SETTINGS["a"]
    shape = shape_from_config(model_config(s.model, s.kind, s.num_labels), s.kind, s.num_labels)
    ctx = PlanContext(
        shape, Workload(batch=s.batch, seq_len=s.seq_len), PlanConfig(fixed_split=SPLITLORA_SPLIT, uniform_rank=8)
    )
    assert SPLITLORA_RANK == 8
    clients = [NodeInfo(f"c{i:02d}", Capabilities(10**9, 10e6, 1.0, True), 0, may_host=False) for i in range(owners)]

    def plan_with(room):
        server = NodeInfo("server", Capabilities(room, 100e6, 1.0, False), None)
        return make_plan([*clients, server], ctx)

    def room(n):
        return server_budget(s.model, s.kind, s.num_labels, s.batch, s.seq_len, SPLITLORA_SPLIT, 8, n)

    plan = plan_with(room(owners))
    assert {(plan[c.node_id].role, plan[c.node_id].helper) for c in clients} == {(OWNER, "server")}
    need, one = room(owners) / WEAK_MARGIN, (room(owners) - room(owners - 1)) / WEAK_MARGIN
    plan = plan_with(int(need - one / 2))
    assert sum(plan[c.node_id].role == WAITING for c in clients) >= 1
