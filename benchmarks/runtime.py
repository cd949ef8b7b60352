"""End-to-end runtime figures: a swarm in one event loop over real sockets.

A bootstrap, one owner that needs a helper (4 MB budget), one strong node that trains
alone (30 MB) and one pure helper, on the embedded tiny-gpt2 (seq_cls, 4 labels) and the
synthetic tasks. Reported per role, from the nodes' own metrics:
- step_rate: training steps per second inside rounds (split steps include the two RPCs);
- act_bytes_per_step, grad_bytes_per_step: activation / gradient bytes on the wire per split step
  (the gradients are counted on whichever node serves the owner: `served_by`);
- adapter_bytes_per_round: factors returned, contributions gossiped, patches served;
- wall_s: from the first join to every node done (rounds, merges, exports);
- lost_updates (must be 0) and whether the cluster's members ended on one chain.
With `--keys both` the same swarm runs four times, with CurveZMQ keys (the default of
every swarm) and `--insecure` in the order on, off, off, on, and `keys_cost` gives the
ratios keys on/off of the mean step rates and wall times, and whether every run ended
with the same losses (keys must not change what is learned).

    python benchmarks/runtime.py [--rounds 3] [--local-steps 8] [--keys on|off|both] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.records import Summary, lost_updates  # noqa: E402
from atlas_p2p.synthetic import write_synthetic_jsonl  # noqa: E402
from nodes.config import SwarmSpec  # noqa: E402
from scenarios.inprocess import InProcessSwarm  # noqa: E402


async def _run(workdir: Path, rounds: int, steps: int, insecure: bool = False) -> dict:
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1)
    timing = dict(heartbeat_s=0.5, suspect_after_s=3.0, dead_after_s=6.0, restart_grace_s=1.0, sweep_s=0.1)
    async with await InProcessSwarm.create(workdir, spec, fingerprint_seed=3, insecure=insecure, **timing) as swarm:
        nodes = {"owner": (4, 0), "whole": (30, 0), "helper": (100, None)}  # MB, task (None: a pure helper)
        for seed, (name, (memory_mb, task)) in enumerate(nodes.items()):
            data = None if task is None else write_synthetic_jsonl(workdir / f"{name}.jsonl", task, 96, seed=seed)
            swarm.add(name, memory_mb * 10**6, data=data, rounds=rounds, local_steps=steps, lr=0.01)
        started = time.perf_counter()
        summaries = await swarm.run()
    wall = time.perf_counter() - started
    figures = {
        "keys": not insecure,
        "wall_s": round(wall, 2),
        "rounds": rounds,
        "local_steps": steps,
        "lost_updates": len(lost_updates(Summary.from_json(x) for x in summaries.values())),
    }
    for name in ("owner", "whole"):
        lines = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        rates = [x["step_rate"] for x in lines if x["step_rate"]]
        b = lines[-1]["bytes_by_kind"]
        n_steps = sum(x["steps"] for x in lines)
        figures[name] = {
            "role": summaries[name]["role"],
            "step_rate": round(sorted(rates)[len(rates) // 2], 2),
            "act_bytes_per_step": b["activations"] // max(n_steps, 1),
            "adapter_bytes_per_round": b["adapters"] // max(len(lines), 1),
            "final_loss": lines[-1]["loss"],
            "first_loss": lines[0]["loss"],
        }
    server = next(n for n, s in summaries.items() if s["node_id"] == summaries["owner"]["helper"])
    served = summaries[server]["steps_served"]
    figures["owner"]["served_by"] = server
    figures["owner"]["grad_bytes_per_step"] = summaries[server]["bytes_by_kind"]["gradients"] // max(served, 1)
    chains = {json.dumps(summaries[n]["manifests_folded"][-1]["digest"]) for n in ("owner", "whole")}
    figures["one_chain"] = len(chains) == 1
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--keys", choices=("on", "off", "both"), default="on", help="CurveZMQ keys (both: a ratio)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    runs: list[tuple[str, dict]] = []
    # both: on, off, off, on, so a drift in the machine's load weighs on both alike
    for keys in ("on", "off", "off", "on") if args.keys == "both" else (args.keys,):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append((keys, asyncio.run(_run(Path(tmp), args.rounds, args.local_steps, insecure=keys == "off"))))
    if len(runs) == 1:
        figures = runs[0][1]
    else:

        def mean(keys: str, get) -> float:
            values = [get(r) for k, r in runs if k == keys]
            return sum(values) / len(values)

        def ratio(get) -> float:
            return round(mean("on", get) / mean("off", get), 3)

        figures = {
            "runs": [dict(r, keys=k == "on") for k, r in runs],
            "keys_cost": {
                "owner_step_rate_ratio": ratio(lambda r: r["owner"]["step_rate"]),
                "whole_step_rate_ratio": ratio(lambda r: r["whole"]["step_rate"]),
                "wall_ratio_off_over_on": round(1 / ratio(lambda r: r["wall_s"]), 3),
                "same_final_losses": len({(r["owner"]["final_loss"], r["whole"]["final_loss"]) for _, r in runs}) == 1,
            },
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(r["lost_updates"] == 0 and r["one_chain"] for _, r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
