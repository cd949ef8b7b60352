"""The in-process engine's hosts on a local Ray instance against worker processes, same run.

    python benchmarks/simulate_ray.py [--nodes 24] [--tasks 4] [--kill 0.25] [--workers 2]
        [--json benchmarks/results/simulate-ray.json]

Runs scenarios/simulate.py's churn run twice with the same config and seed: the nodes on
`--workers` worker processes (scenarios.hosts.ProcessHost), then on as many Ray actors
(scenarios.ray_hosts.RayHost) of a Ray instance started in this process. The bootstrap
stays in this process both times. Prints and writes each run's accounting (finished,
survivors, lost updates, repairs, ARI, acceptance failures), wall time and peak RSS, and
whether both runs pass churn's checks with the same survivors finishing. Needs Ray
(pip install 'atlas-p2p[ray]'); CI does not run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/simulate_ray.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scenarios.ray_hosts import ray_hosts, require_ray  # noqa: E402
from scenarios.simulate import SimulateRun, simulate_config, simulate_failures  # noqa: E402
from transport.rpc import install_uvloop  # noqa: E402

KEYS = ("nodes", "killed", "finished", "survivors", "lost_updates", "repairs", "ari", "wall_s", "peak_rss_mb")


def one_run(args: argparse.Namespace, workdir: Path, engine: str) -> dict[str, Any]:
    config = simulate_config(args.nodes, args.tasks, args.kill, rounds=args.rounds, local_steps=args.local_steps)
    make_hosts = ray_hosts("local") if engine == "ray" else None
    run = SimulateRun(
        config, workdir, say=lambda line: print(f"  [{engine}] {line}"), workers=args.workers, make_hosts=make_hosts
    )
    result = asyncio.run(run.run())
    figures = {k: result[k] for k in KEYS}
    figures["acceptance_failures"] = simulate_failures(result)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--kill", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="worker processes, then as many Ray actors")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/simulate-ray.json"))
    args = parser.parse_args(argv)
    ray = require_ray()
    install_uvloop()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="atlas-simulate-ray-") as tmp:
        for engine in ("processes", "ray"):
            print(
                f"{engine}: {args.nodes} nodes on {args.workers} {'Ray actors' if engine == 'ray' else 'worker processes'}"
            )
            runs[engine] = one_run(args, Path(tmp) / engine, engine)
    ray.shutdown()
    same = sorted(runs["processes"]["finished"]) == sorted(runs["processes"]["survivors"]) and sorted(
        runs["ray"]["finished"]
    ) == sorted(runs["ray"]["survivors"])
    result = {
        "config": vars(args) | {"json": str(args.json)},
        "ray_version": ray.__version__,
        "runs": runs,
        "both_pass": not runs["processes"]["acceptance_failures"] and not runs["ray"]["acceptance_failures"],
        "every_survivor_finished_in_both": same,
    }
    print(f"{'':12}{'finished':>10}{'survivors':>11}{'lost':>6}{'repairs':>9}{'ARI':>6}{'wall s':>8}{'peak MB':>9}")
    for engine, r in runs.items():
        print(
            f"{engine:12}{len(r['finished']):>10}{len(r['survivors']):>11}{r['lost_updates']:>6}{r['repairs']:>9}"
            f"{r['ari']:>6.2f}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>9,.0f}"
        )
    print(f"both pass churn's checks: {result['both_pass']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {args.json}")
    return 0 if result["both_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
