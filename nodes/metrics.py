"""What a node writes as it runs: one metrics line per round (JSONL) and atomic JSON files.

Bytes by kind come from the RPC layer (transport/rpc.py counts the encoded frames it
sends; atlas_p2p.records.bytes_by_kind sorts them into kinds). `summary.json` is written
once at the end (atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl under the node's --out: one JSON object per line, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]


def lost_updates(summaries: list[dict[str, Any]]) -> int:
    """Contributions no folded patch took in, directly or carried inside a later one.

    A contribution of node n in round r counts as merged when some node folded a patch of
    round r whose weights name n, or when a later contribution of n was merged (it carried
    the earlier one: training.carry_over). `summaries` are the nodes' summary.json contents.
    """
    merged: set[tuple[str, int]] = set()
    for s in summaries:
        for m in s.get("manifests_folded", []):
            for n in m.get("nodes", []):
                merged.add((str(n), int(m["round"])))
    lost = 0
    for s in summaries:
        node = str(s.get("node_id"))
        rounds = sorted(int(c["round"]) for c in s.get("contributions", []))
        for i, r in enumerate(rounds):
            if not any((node, later) in merged for later in rounds[i:]):
                lost += 1
    return lost
