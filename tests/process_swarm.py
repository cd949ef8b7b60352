"""What the real-process tests start their swarms with, so each test names only what differs.

Every process test trains the tiny model on a 4-label seq_cls task; most nodes train a few
rounds of 3 local steps at lr 0.01 on 48 synthetic examples of one task. A keyword becomes
its `atlas-node` flag: `flags(dead_after=3, min_nodes=2)` is
`["--dead-after", "3", "--min-nodes", "2"]`.
"""

from __future__ import annotations

import json
from pathlib import Path

from atlas_p2p.synthetic import write_synthetic_jsonl
from scenarios.swarm import Child, Swarm

# `atlas-node join` with every required flag, for tests of flag errors that stop it before
# it reaches a bootstrap (nothing listens on the port)
OFFLINE_JOIN = ["join", "--bootstrap", "127.0.0.1:5555", "--memory", "1GB", "--bandwidth", "1Mbps", "--insecure"]


def flags(**options: object) -> list[str]:
    """`--name value` for each keyword, underscores in the name written as dashes, in order."""
    out: list[str] = []
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def bootstrap_flags(**options: object) -> list[str]:
    """`atlas-node bootstrap` flags: the 4-label seq_cls task, then `options`.

    The first assignment waits for --min-nodes fingerprints (--assign-after 600 unless a
    test sets it): on a loaded machine a node takes tens of seconds to start, and the
    default 30 s timer would plan the swarm before the test's nodes are all in."""
    return flags(task="seq_cls", num_labels=4, **{"assign_after": 600, **options})


def training_flags(rounds: int, **options: object) -> list[str]:
    """`atlas-node join` flags: `rounds` rounds of 3 local steps at lr 0.01, then `options`
    (which may also set local_steps or lr)."""
    return flags(**{"rounds": rounds, "local_steps": 3, "lr": 0.01, **options})


def data_file(swarm: Swarm, name: str, task: int, seed: int) -> Path:
    """48 synthetic examples of `task` drawn with `seed`, written to NAME.jsonl in the swarm's work dir."""
    return write_synthetic_jsonl(swarm.workdir / f"{name}.jsonl", task, 48, seed=seed)


def add_data_node(swarm: Swarm, name: str, *, task: int, seed: int, memory: str, extra: list[str]) -> Child:
    """Start node `name` with --out on its own `data_file` and the `atlas-node join` flags `extra`."""
    return swarm.add_node(name, memory=memory, data=data_file(swarm, name, task, seed), extra=extra, out=True)


def metrics_lines(swarm: Swarm, name: str) -> list[dict]:
    """The round lines node `name` has written to its metrics.jsonl so far ([] before the first,
    or while a line is half written)."""
    try:
        return [json.loads(x) for x in (swarm.out_dir(name) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []
