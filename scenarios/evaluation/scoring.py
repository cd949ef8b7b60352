"""Scores of one method's run, from what its nodes wrote (pure: no model, no sockets).

- per-task accuracy: the mean over a task's nodes of the accuracy of the adapter each node
  exported, loaded with stock PEFT, on that task's held-out rows (a pooled node is scored on
  every task);
- the curve: per round, the mean over tasks of the mean over the task's nodes of the
  accuracy (or perplexity) the node measured after that round;
- rounds and wall time to a target: the first round whose curve value reaches it, and the
  seconds from the method's start to the last node's end of that round;
- bytes per node by kind: the mean over data nodes of what each sent (running totals of
  its last round line).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any

from tools import report


def mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return fmean(kept) if kept else None


def per_task(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """{task: mean over nodes} from {node: {task: score}} (a node may be scored on several tasks)."""
    tasks = list(dict.fromkeys(t for by_task in scores.values() for t in by_task))
    return {t: mean_or_none([s[t] for s in scores.values() if t in s]) for t in tasks}


def curve(runs: Mapping[str, report.NodeRun], task_of: Mapping[str, str]) -> dict[int, float]:
    """{round: mean over tasks of the mean over that task's nodes} of the per-round evaluation."""
    by_round: dict[int, dict[str, list[float]]] = {}
    for name, run in runs.items():
        for row in run.rows:
            value = report.eval_value(row)
            if value is not None:
                by_round.setdefault(row.round, {}).setdefault(task_of[name], []).append(value[1])
    return {r: fmean(fmean(v) for v in tasks.values()) for r, tasks in sorted(by_round.items())}


def round_ends(runs: Mapping[str, report.NodeRun], started: float) -> dict[int, float]:
    """{round: seconds from `started` until the last node ended it}."""
    ends: dict[int, float] = {}
    for run in runs.values():
        for row in run.rows:
            ends[row.round] = max(ends.get(row.round, 0.0), row.time - started)
    return dict(sorted(ends.items()))


def to_target(
    series: Mapping[int, float], ends: Mapping[int, float], target: float | None, higher_is_better: bool = True
) -> tuple[int | None, float | None]:
    """(rounds, seconds) until `series` first reaches `target` (rounds count from 1); (None, None) if never."""
    if target is None:
        return None, None
    for r, value in sorted(series.items()):
        if (value >= target) if higher_is_better else (value <= target):
            return r + 1, ends.get(r)
    return None, None


def bytes_per_node(runs: Mapping[str, report.NodeRun]) -> dict[str, float]:
    """{kind: mean bytes sent per data node}."""
    totals = [report.sent_totals(run.rows) for run in runs.values()]
    kinds = sorted({k for t in totals for k in t})
    return {k: fmean(t.get(k, 0) for t in totals) for k in kinds} if totals else {}


def clustering(runs: Mapping[str, report.NodeRun], task_of: Mapping[str, str]) -> dict[str, Any]:
    """K, ARI and NMI of the clusters the nodes ended in against their true tasks."""
    from atlas_p2p.clustering import adjusted_rand, normalized_mutual_info

    names = [n for n, run in runs.items() if run.cluster is not None]
    truth = [task_of[n] for n in names]
    found = [str(runs[n].cluster) for n in names]
    if not names:
        return {"k": 0, "ari": None, "nmi": None}
    return {
        "k": len(set(found)),
        "ari": float(adjusted_rand(truth, found)),
        "nmi": float(normalized_mutual_info(truth, found)),
    }
