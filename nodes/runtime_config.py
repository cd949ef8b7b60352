"""Frozen settings of the training runtime (issue #4): the swarm's and one node's.

`SwarmSpec` is what the bootstrap decides for everyone (model, task, when to cluster);
`TrainConfig` is how one node trains (`atlas-node join` flags). Every field says what it
means; `__post_init__` names the field and the bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

TASKS = ("causal_lm", "seq_cls")
SPLIT_MODES = ("two-part", "u-shape")
EMBEDDED_MODELS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama", "tiny-bert": "bert"}
FINGERPRINT_SAMPLES = 256  # default m; real text needs it (docs/DECISIONS.md, benchmarks/fingerprint_sweep.py)


def _int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _num(name: str, value: object, *, positive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass(frozen=True)
class SwarmSpec:
    """What the bootstrap decides for the whole swarm (`atlas-node bootstrap` flags)."""

    model: str = "tiny-gpt2"  # embedded tiny-* name, or an HF id / local path
    task: str = "causal_lm"  # causal_lm | seq_cls
    num_labels: int | None = None  # classes (seq_cls only)
    min_nodes: int = 2  # fingerprints that trigger the first clustering
    assign_after_s: float = 30.0  # ... or seconds after the first fingerprint
    clusters: int | None = None  # fixed K; None: chosen by silhouette
    batch_size: int = 4  # planning workload: sequences per step
    max_seq_len: int = 32  # planning workload: tokens per sequence
    split_mode: str = "two-part"  # two-part | u-shape
    fingerprint_samples: int = FINGERPRINT_SAMPLES  # m: examples each node's fingerprint averages over

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty name, got {self.model!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "seq_cls":
            _int("num_labels", self.num_labels, 1)
        elif self.num_labels is not None:
            raise ValueError(f"num_labels is for task seq_cls only, got {self.num_labels!r} with {self.task}")
        _int("min_nodes", self.min_nodes, 1)
        _num("assign_after_s", self.assign_after_s, positive=False)
        if self.clusters is not None:
            _int("clusters", self.clusters, 1)
        _int("batch_size", self.batch_size, 1)
        _int("max_seq_len", self.max_seq_len, 2)
        _int("fingerprint_samples", self.fingerprint_samples, 1)
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How one node trains (`atlas-node join` flags)."""

    out_dir: Path | None  # adapter, metrics.jsonl, summary.json, checkpoint/ (None: a helper writes nothing)
    rounds: int = 3  # merge rounds to train
    local_steps: int = 5  # E: steps per round
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3  # AdamW learning rate (owner and its helper)
    max_seq_len: int = 32  # tokens per sequence (longer ones are cut)
    device: str = "cpu"  # torch device
    seed: int = 0  # batch order seed (the round seeds come from the swarm's seed)
    eval_path: Path | None = None  # held-out JSONL: accuracy (seq_cls) or perplexity (causal_lm) per round
    split_mode: str | None = None  # two-part | u-shape; None: the swarm's (the bootstrap decides)
    export_rank: int | None = None  # None: exact export (numerical rank per module); R: lossy, ranks capped at R
    threads: int = 1  # torch threads of the node's single executor thread
    step_timeout_s: float = 10.0  # deadline of one forward/backward exchange before the helper is reported
    round_deadline_s: float = 20.0  # anchor publishes this long after a round's first contribution
    fanout: int = 2  # gossip: members each contribution is pushed to
    poll_s: float = 0.1  # how often waits re-check (manifest, assignment)
    step_delay_s: float = 0.0  # extra seconds per step: emulates a slow device (stragglers in scenarios)
    emulate_link: bool = False  # shape this node's sends by its own --bandwidth (scenarios on one machine)
    latency_ms: float = 0.0  # with emulate_link: one-way delay added to every message this node sends

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.eval_path is not None:
            object.__setattr__(self, "eval_path", Path(self.eval_path))
        for name in ("rounds", "local_steps", "batch_size", "threads"):
            _int(name, getattr(self, name), 1)
        if self.export_rank is not None:
            _int("export_rank", self.export_rank, 1)
        _int("max_seq_len", self.max_seq_len, 2)
        _int("fanout", self.fanout, 0)
        _int("seed", self.seed, 0)
        for name in ("lr", "step_timeout_s", "round_deadline_s", "poll_s"):
            _num(name, getattr(self, name))
        _num("step_delay_s", self.step_delay_s, positive=False)
        if not isinstance(self.emulate_link, bool):
            raise ValueError(f"emulate_link must be a bool, got {self.emulate_link!r}")
        _num("latency_ms", self.latency_ms, positive=False)
        if self.latency_ms and not self.emulate_link:
            raise ValueError(f"latency_ms ({self.latency_ms!r}) is emulated only with emulate_link")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a torch device name, got {self.device!r}")
        if self.split_mode is not None and self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES} (or None: the swarm's), got {self.split_mode!r}")
