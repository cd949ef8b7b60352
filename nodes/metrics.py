"""What a node measures: bytes sent by kind, and one metrics line per round (JSONL).

Kinds (DESIGN 5): activations, gradients, adapters, fingerprints, control. A byte count is
the encoded size of the message as it leaves (header plus tensor frames), so it is what
the link carries. `summary.json` is written once at the end (atomically).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

KINDS = ("activations", "gradients", "adapters", "fingerprints", "control")

# message type -> kind of the bytes it carries
KIND_OF = {
    "forward": "activations",
    "backward": "gradients",
    "hidden": "activations",  # u-shape: the helper's output hidden states
    "u_backward": "gradients",  # u-shape: the owner's gradient of those hidden states
    "server_adapter": "adapters",
    "contribution": "adapters",
    "patches": "adapters",
    "fingerprint": "fingerprints",
    "probe": "fingerprints",  # owner activations of a fingerprint computed across a cut
}


def wire_size(body: Any) -> int:
    """Encoded size of a message body in bytes (zero-copy encode, nothing is sent)."""
    from transport.codec import encode
    from transport.messages import Envelope

    frames = encode(Envelope.of(body, 0, "x"))
    return sum(memoryview(f).nbytes if not isinstance(f, bytes) else len(f) for f in frames)


class ByteMeter:
    """Bytes sent by kind; thread-safe (handlers and the round loop both count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: Counter[str] = Counter({k: 0 for k in KINDS})

    def count(self, body: Any) -> int:
        kind = KIND_OF.get(type(body).TYPE, "control")
        n = wire_size(body)
        with self._lock:
            self._bytes[kind] += n
        return n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: int(self._bytes[k]) for k in KINDS}


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
