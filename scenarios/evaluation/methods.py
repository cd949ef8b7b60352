"""The methods the evaluation puts side by side, as settings of the one runtime.

Every method runs through the real runtime (bootstrap, peers, helpers, merges over
loopback sockets); what tells them apart is who holds which data, how the bootstrap groups
the nodes and how a group merges:

- `data`: "nodes" keeps the partition (each node its own examples); "pooled" gives all
  examples to one node; "per-task" gives each task's examples to one node (an oracle: it
  uses the true task ids the other methods never see).
- `clusters`: "auto" lets the bootstrap choose K from the fingerprints; "one" puts every
  data node in one cluster (no task awareness); "each" gives every data node a cluster of
  its own (nothing merged across nodes).
- `merge`: "reduce" sums contributions up a tree to the cluster's anchor (a server-like
  exact aggregation); "gossip" pushes every contribution to every member (peer-to-peer).

- `spec`: other swarm settings (nodes.config.SwarmSpec): SplitLoRA's one cut
  (`fixed_split`), one rank (`uniform_rank`) and factor-wise average (`merge_rule` fedavg);
  MIRA's personal adapters (`merge_rule` mira).
- `server`: one more helper with room for every data node's later blocks (SplitLoRA's one
  server for all its clients; the population's helpers are sized for a few weak owners).
- `whole`: every data node gets a budget for the whole model (MIRA has no split: its
  devices hold the model), so weak devices do not apply.

A pooled node gets `steps_scale` x the per-node step budget: as many examples processed as
the whole population processes, so the upper bounds are measured at equal compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# SplitLoRA's client keeps the embeddings and the first 3 blocks; the weak devices of the
# evaluation's populations fit 2, so the one cut every device can run is 2 blocks.
SPLITLORA_SPLIT = 2
SPLITLORA_RANK = 8


@dataclass(frozen=True)
class Method:
    name: str
    data: str  # nodes | pooled | per-task
    clusters: str  # auto | one | each
    merge: str  # reduce | gossip
    summary: str
    spec: Mapping[str, Any] = field(default_factory=dict)
    whole: bool = False
    server: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("centralized", "pooled", "each", "reduce", "one LoRA on all data pooled (upper bound for one adapter)"),
        Method("per-task", "per-task", "each", "reduce", "one LoRA per task on its pooled data (the oracle)"),
        Method("local", "nodes", "each", "reduce", "each node alone on its own data"),
        Method(
            "splitlora",
            "nodes",
            "one",
            "gossip",
            f"one cut ({SPLITLORA_SPLIT} blocks), rank {SPLITLORA_RANK} everywhere, one server for every client, "
            "factor-wise FedAvg over everyone",
            {"merge_rule": "fedavg", "fixed_split": SPLITLORA_SPLIT, "uniform_rank": SPLITLORA_RANK},
            server=True,
        ),
        Method(
            "hsplitlora",
            "nodes",
            "one",
            "reduce",
            "budget ranks and split points, exact aggregation over everyone at an anchor, no clustering",
        ),
        Method(
            "taskblind",
            "nodes",
            "one",
            "gossip",
            "peer-to-peer split learning over everyone, gossip merge, no task awareness (TITANIC-like)",
        ),
        Method(
            "mira",
            "nodes",
            "auto",
            "gossip",
            "personal adapters pulled halfway to their fingerprint cluster's mean each round, no split",
            {"merge_rule": "mira"},
            whole=True,
        ),
        Method("atlas", "nodes", "auto", "reduce", "task-aware clusters, budget split and ranks, exact reduce"),
    )
}


def parse_methods(text: str) -> list[Method]:
    """A comma-separated list of method names (or "all"), in the order given; ValueError names an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(METHODS)}")
    return [METHODS[n] for n in names]
