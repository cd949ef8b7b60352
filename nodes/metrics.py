"""What a node writes as it runs: one metrics line per round (JSONL), its summary and atomic JSON files.

The records are atlas_p2p.records' (`RoundLine`, `Summary`), which tools/report.py reads
back. Bytes by kind come from the RPC layer (transport/rpc.py counts the encoded frames it
sends; atlas_p2p.records.bytes_by_kind sorts them into kinds). `summary.json` is written
once at the end (atomically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from atlas_p2p.records import RoundLine, Summary

SUMMARY_FILE = "summary.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_summary(out_dir: Path, summary: Summary) -> Path:
    """`summary.json` under `out_dir`, atomically."""
    path = Path(out_dir) / SUMMARY_FILE
    write_json_atomic(path, summary.to_json())
    return path


class MetricsLog:
    """metrics.jsonl under the node's --out: one JSON object per line, appended and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: RoundLine) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line.to_json(), sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def lines(self) -> list[RoundLine]:
        if not self.path.exists():
            return []
        return [RoundLine.from_json(json.loads(x)) for x in self.path.read_text().splitlines() if x.strip()]
