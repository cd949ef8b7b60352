"""Who holds which examples: the partition of each task over its nodes, and the pooled variants.

Rows are dicts with "text" and "label" (classification) or "text" (language modelling).
The true task of a node is known here (the evaluation scores with it); the files the nodes
read carry only "text" and "label", never "task".

Partitions, within each task (one task per node in every case):
- `task`: disjoint equal slices of the task's shuffled training rows (the default);
- `dirichlet`: the task's rows dealt by label with proportions from Dir(alpha) (label skew);
- `length`: SplitFT's length-based Dirichlet: rows cut into length-quantile bins, each bin
  dealt with proportions from Dir(alpha).
The first node of each task (index 0) is `weak`: its budget is below the whole model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_p2p.partition import dirichlet_label_skew, length_dirichlet

PARTITIONS = ("task", "dirichlet", "length")
Row = dict[str, Any]


@dataclass(frozen=True)
class NodeData:
    name: str
    task: str  # the true task (scoring only)
    rows: tuple[Row, ...]
    weak: bool = False


def shuffled(rows: Sequence[Row], seed: int | str) -> list[Row]:
    out = list(rows)
    random.Random(str(seed)).shuffle(out)
    return out


def training_rows(row: Row) -> Row:
    """What a node's file keeps of a row: the text and the label, not the task."""
    return {k: row[k] for k in ("text", "label") if k in row}


def partition_task(
    rows: Sequence[Row], nodes: int, per_node: int, how: str, alpha: float, seed: int
) -> list[list[Row]]:
    """`nodes` slices of one task's rows (`nodes * per_node` of them in all) by `how` (module doc)."""
    if how not in PARTITIONS:
        raise ValueError(f"partition {how!r}: choose from {', '.join(PARTITIONS)}")
    need = nodes * per_node
    if need > len(rows):
        raise ValueError(f"{nodes} nodes x {per_node} examples need {need} rows; the task has {len(rows)}")
    pool = list(rows[:need])
    if how == "task":
        return [pool[i * per_node : (i + 1) * per_node] for i in range(nodes)]
    if how == "dirichlet":
        parts = dirichlet_label_skew([int(r["label"]) for r in pool], nodes, alpha, seed, min_size=2)
    else:
        parts = length_dirichlet([len(str(r["text"]).split()) for r in pool], nodes, alpha, seed)
    return [[pool[int(i)] for i in part] for part in parts]


def build_population(
    train: Mapping[str, Sequence[Row]], nodes_per_task: int, per_node: int, how: str, alpha: float, seed: int
) -> list[NodeData]:
    """Nodes `TASK-i` for every task (in the given order), rows shuffled by the seed first."""
    out = []
    for task, rows in train.items():
        parts = partition_task(shuffled(rows, f"{seed}:{task}"), nodes_per_task, per_node, how, alpha, seed)
        for i, part in enumerate(parts):
            if not part:
                raise ValueError(f"partition {how} (alpha {alpha}) left node {task}-{i} without examples")
            out.append(NodeData(f"{task}-{i}", task, tuple(part), weak=i == 0))
    return out


def pooled(nodes: Sequence[NodeData], data: str) -> list[NodeData]:
    """The data nodes of a method: the partition itself ("nodes"), one node with every row
    ("pooled") or one per task with that task's rows ("per-task"); pooled nodes are strong."""
    if data == "nodes":
        return list(nodes)
    if data == "pooled":
        return [NodeData("pooled", "*", tuple(r for n in nodes for r in n.rows))]
    if data == "per-task":
        tasks = list(dict.fromkeys(n.task for n in nodes))
        return [NodeData(f"{t}-pooled", t, tuple(r for n in nodes if n.task == t for r in n.rows)) for t in tasks]
    raise ValueError(f"data {data!r}: expected nodes, pooled or per-task")


def write_rows(path: Path, rows: Sequence[Row]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(training_rows(r)) + "\n" for r in rows), encoding="utf-8")
    return path
