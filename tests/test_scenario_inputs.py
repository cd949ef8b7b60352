"""What the churn scenarios feed a model other than the embedded one: budgets fitted to its
footprint (scenarios/budgets.py) and real-text data files (scenarios/textdata.py)."""

import json

import pytest

from atlas_p2p.memory import Workload, lora_candidates, owner_footprint, shape_from_config
from atlas_p2p.planning import PlanConfig, fits_whole_model, minimum_ranks
from nodes.modelname import build_model, model_config
from scenarios.budgets import WEAK_BLOCKS, fit_budgets, role_budgets
from scenarios.churn import HELPER_MEMORY, STRONG_MEMORY, WEAK_MEMORIES, ChurnConfig, plan_nodes
from scenarios.textdata import text_tasks, write_text_data
from transport.units import parse_size

BATCH, SEQ = 8, 16


def test_the_embedded_model_keeps_churns_budgets(tmp_path):
    specs = plan_nodes(ChurnConfig(nodes=8, tasks=2), tmp_path)

    assert fit_budgets(specs, "tiny-gpt2", "seq_cls", 4, BATCH, SEQ) == specs


def test_each_role_gets_a_budget_that_plans_as_that_role():
    model, task = "tiny-llama", "causal_lm"
    shape = shape_from_config(model_config(model, task, None), task, None)
    workload = Workload(batch=BATCH, seq_len=SEQ)
    ranks = minimum_ranks(lora_candidates(shape), {})
    headroom = PlanConfig().headroom

    budgets = role_budgets(model, task, None, BATCH, SEQ)

    assert fits_whole_model(shape, budgets[STRONG_MEMORY], workload)
    assert budgets[HELPER_MEMORY] > budgets[STRONG_MEMORY]
    for memory, blocks in zip(WEAK_MEMORIES, WEAK_BLOCKS):
        assert not fits_whole_model(shape, budgets[memory], workload)
        runs = owner_footprint(shape, blocks, ranks, workload).total / headroom
        more = owner_footprint(shape, blocks + 1, ranks, workload).total / headroom
        assert runs <= budgets[memory] < more, memory


def test_a_model_by_path_gets_its_fitted_budgets_as_sizes_a_node_accepts(tmp_path):
    model = tmp_path / "model"
    build_model("tiny-llama", "causal_lm", None).config.save_pretrained(model)  # a local HF model's config
    specs = plan_nodes(ChurnConfig(nodes=8, tasks=2), tmp_path)

    fitted = fit_budgets(specs, str(model), "causal_lm", None, BATCH, SEQ)

    budgets = role_budgets(str(model), "causal_lm", None, BATCH, SEQ)
    assert [parse_size(f.memory) for f in fitted] == [budgets[s.memory] for s in specs]
    assert budgets == role_budgets("tiny-llama", "causal_lm", None, BATCH, SEQ)


def _task(folder, name, train, test):
    for split, n in (("train", train), ("test", test)):
        rows = [{"text": f"{name} {split} {i}", "label": i % 4} for i in range(n)]
        (folder / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_nodes_of_a_task_get_disjoint_training_runs_of_their_task(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _task(src, "b_task", 50, 10)
    _task(src, "a_task", 50, 10)
    (src / "lonely.train.jsonl").write_text("")  # no test file: not a task
    config = ChurnConfig(nodes=8, tasks=2, train_examples=10, eval_examples=6)
    specs = plan_nodes(config, tmp_path / "out")

    names = write_text_data(specs, config, src)

    assert names == text_tasks(src) == ["a_task", "b_task"]
    for t, name in enumerate(names):
        nodes = [s for s in specs if s.task == t]
        train = [_texts(s.data) for s in nodes]
        assert all(len(x) == 10 and all(text.startswith(f"{name} train") for text in x) for x in train)
        assert len({text for x in train for text in x}) == 10 * len(nodes)
        assert all(len(_texts(s.eval)) == 6 and _texts(s.eval)[0].startswith(f"{name} test") for s in nodes)


def test_too_few_tasks_is_one_clear_error(tmp_path):
    _task(tmp_path, "only", 5, 5)
    config = ChurnConfig(nodes=8, tasks=2)

    with pytest.raises(ValueError, match="has 1 task"):
        write_text_data(plan_nodes(config, tmp_path / "out"), config, tmp_path)
