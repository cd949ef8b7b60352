"""Synthetic multi-task data: same inputs for every task, conflicting targets.

Every example is a short sentence of filler words with exactly one *key* word somewhere
in it, e.g. ``w17 w03 k2 w40``. The key decides the target, and each task maps keys
to targets differently:

    target_t(k) = (k + t) mod L                  for t < L   (a cyclic Latin square)
    target_t(k) = a seeded balanced map          for t >= L  (chosen to disagree most
                                                              with the earlier tasks)

with L = ``num_labels``. For t < L two tasks disagree on *every* key, so one shared
adapter can be right for at most one of them; the input distribution is the same for
all tasks, so only the targets (and hence the gradients) tell tasks apart, which is what
task-aware clustering has to find.

Keys are not equally frequent: P(k) ∝ (k+1)^(-s) (``key_skew`` s, the same for every
task), so each task also has its own label prior, as real tasks do. This matters for
fingerprints: at a random base the per-example gradient is roughly (head row of the
label − mean row) · ∂h/∂θ, and with perfectly balanced labels the key-independent part
of ∂h/∂θ cancels in the mean, leaving a task signal of a few percent of the
per-example variance. With s = 1.5 (P ≈ 0.60, 0.21, 0.12, 0.07) the 4 tasks x 5
clients of ``benchmarks/clustering.py`` separate at m = 32 for classification (ARI
0.98–1.0 over 8 base seeds); prompt/completion data needs m = 64, plain LM text (one
informative token among many) m >= 256.

Three record kinds (the JSONL formats of DESIGN 11), shown for task 0:

- ``classification``: ``{"text": "w17 w03 k2 w40", "label": 2}``
- ``instruction``:    ``{"prompt": "w17 w03 k2 w40 ?", "completion": "a2"}``
- ``lm``:             ``{"text": "w17 w03 k2 w40 ? a2"}``

Each record also carries ``"task": t`` for scoring only. Generation is deterministic
for ``(config, task, n, kind, seed)``. :func:`synthetic_tokenizer` gives a real
``PreTrainedTokenizerFast`` (word-level) over exactly this vocabulary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("classification", "lm", "instruction")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3; pad/bos/eos match models.tiny_model
QUESTION = "?"  # ends an instruction prompt; the completion follows it


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic task family (the same config on every node)."""

    num_tasks: int = 4  # how many conflicting tasks exist
    num_labels: int = 4  # L: classes (classification) or answer words (lm/instruction)
    num_keys: int = 4  # key words; each task maps every key to one of the L targets
    num_fillers: int = 48  # filler (distractor) words shared by all tasks
    min_words: int = 2  # shortest sentence, key included
    max_words: int = 8  # longest sentence, key included
    key_skew: float = 1.5  # s: P(key k) ∝ (k+1)^(-s), the same for every task; 0 = uniform
    seed: int = 0  # fixes the maps of tasks t >= num_labels

    def __post_init__(self) -> None:
        for name in ("num_tasks", "num_keys", "num_fillers", "min_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_labels, int) or self.num_labels < 2:
            raise ValueError(f"SyntheticConfig.num_labels must be an int >= 2, got {self.num_labels!r}")
        if self.num_keys < self.num_labels:
            raise ValueError(f"SyntheticConfig.num_keys must be >= num_labels ({self.num_labels}), got {self.num_keys}")
        if not isinstance(self.max_words, int) or self.max_words < self.min_words:
            raise ValueError(
                f"SyntheticConfig.max_words must be an int >= min_words ({self.min_words}), got {self.max_words!r}"
            )
        if not (isinstance(self.key_skew, (int, float)) and 0 <= self.key_skew < 16):
            raise ValueError(f"SyntheticConfig.key_skew must be a number in [0, 16), got {self.key_skew!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SyntheticConfig.seed must be an int, got {self.seed!r}")


class SyntheticTasks:
    """The generator: vocabulary, per-task key->target maps and record sampling."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()

    # -- vocabulary ---------------------------------------------------------------
    @cached_property
    def fillers(self) -> tuple[str, ...]:
        width = len(str(self.config.num_fillers - 1))
        return tuple(f"w{i:0{width}d}" for i in range(self.config.num_fillers))

    @cached_property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"k{i}" for i in range(self.config.num_keys))

    @cached_property
    def answers(self) -> tuple[str, ...]:
        return tuple(f"a{i}" for i in range(self.config.num_labels))

    @cached_property
    def vocabulary(self) -> tuple[str, ...]:
        """Every token the generator can emit, special tokens first (ids 0..3)."""
        return SPECIAL_TOKENS + self.fillers + self.keys + self.answers + (QUESTION,)

    # -- task maps ----------------------------------------------------------------
    @cached_property
    def task_maps(self) -> np.ndarray:
        """(num_tasks, num_keys) int array: target of key k under task t."""
        cfg = self.config
        base = np.arange(cfg.num_keys) % cfg.num_labels  # (K,) balanced over labels
        maps: list[np.ndarray] = []
        rng = np.random.default_rng([cfg.seed, 0x7A5C])
        for t in range(cfg.num_tasks):
            if t < cfg.num_labels:
                maps.append((base + t) % cfg.num_labels)
                continue
            # Beyond L tasks a full disagreement is impossible; keep the balanced map
            # (out of 64 seeded shuffles) that agrees least with any earlier task.
            best, best_overlap = None, None
            for _ in range(64):
                cand = rng.permutation(base)
                overlap = max(int(np.sum(cand == m)) for m in maps)
                if best_overlap is None or overlap < best_overlap:
                    best, best_overlap = cand, overlap
            maps.append(best)
        return np.stack(maps).astype(np.int64)

    @cached_property
    def key_probs(self) -> np.ndarray:
        """(num_keys,) probability of each key, shared by all tasks."""
        w = (np.arange(self.config.num_keys) + 1.0) ** (-float(self.config.key_skew))
        return w / w.sum()

    def target(self, task: int, key: int) -> int:
        """Target id (label or answer word index) of key ``key`` under task ``task``."""
        self._check_task(task)
        if not 0 <= key < self.config.num_keys:
            raise ValueError(f"key must be in [0, {self.config.num_keys}), got {key}")
        return int(self.task_maps[task, key])

    # -- sampling -----------------------------------------------------------------
    def generate(self, task: int, n: int, kind: str = "classification", seed: int = 0) -> list[dict]:
        """``n`` records of task ``task`` in the JSONL shape of ``kind`` (see module doc).

        The sentence for example i depends only on (config, seed), not on the task, so
        the same seed gives every task the same inputs with different targets.
        """
        self._check_task(task)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, seed, 0x5E17])
        records = []
        for _ in range(n):
            length = int(rng.integers(cfg.min_words, cfg.max_words + 1))
            words = [self.fillers[i] for i in rng.integers(0, cfg.num_fillers, size=length - 1)]
            key = int(rng.choice(cfg.num_keys, p=self.key_probs))
            words.insert(int(rng.integers(0, length)), self.keys[key])
            sentence = " ".join(words)
            label = int(self.task_maps[task, key])
            if kind == "classification":
                rec = {"text": sentence, "label": label}
            elif kind == "instruction":
                rec = {"prompt": f"{sentence} {QUESTION}", "completion": self.answers[label]}
            else:
                rec = {"text": f"{sentence} {QUESTION} {self.answers[label]}"}
            rec["task"] = task
            records.append(rec)
        return records

    def _check_task(self, task: int) -> None:
        if not isinstance(task, (int, np.integer)) or not 0 <= task < self.config.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.config.num_tasks}), got {task!r}")


def synthetic_tokenizer(config: SyntheticConfig | None = None):
    """A real ``transformers.PreTrainedTokenizerFast`` over the generator's vocabulary.

    Word-level model (``tokenizers.models.WordLevel``), whitespace pre-tokenizer, and
    the special tokens pad ``<pad>`` (id 0), bos ``<s>`` (1), eos ``</s>`` (2) and unk
    ``<unk>`` (3); pad/bos/eos are the ids ``models.tiny_model`` configures. No
    post-processor: ``data.py`` decides where eos goes.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SyntheticTasks(config).vocabulary)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=512,
    )


def write_synthetic_jsonl(
    path: str | Path,
    task: int,
    n: int,
    kind: str = "classification",
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> Path:
    """Write ``n`` records of ``task`` to ``path`` as JSONL (one record per line)."""
    records = SyntheticTasks(config).generate(task, n, kind, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    logger.info("wrote %d %s records of task %d to %s", n, kind, task, path)
    return path
