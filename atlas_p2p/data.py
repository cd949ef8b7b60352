"""JSONL records, tokenisation and seeded batching (DESIGN 11).

Three record kinds, one per file:

- ``classification``: ``{"text": str, "label": int}``
- ``lm``:             ``{"text": str}`` (loss on every real token)
- ``instruction``:    ``{"prompt": str, "completion": str}`` (loss on the completion only)

A record may carry ``"task"`` (str or int). It is kept apart, in ``Records.tasks``, for
scoring clustering; :class:`Example` has no task field, so nothing downstream of the
loader (tokenisation, batches, fingerprints, training) can see it. Other extra fields
(ids, label names, ...) are ignored.

Flow: ``load_jsonl(path) -> Records``; ``encode(records, tokenizer, max_len) -> Encoded``
(token ids and per-example targets, unpadded); ``iterate_batches(encoded, batch_size,
seed=...)`` yields padded batches ``{"input_ids", "attention_mask", "labels"}``;
``round_batches`` cuts one round's steps out of that stream. ``load_for_task`` is load +
encode for a swarm's task, refusing records of a kind the task cannot train on.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlas_p2p.validation import is_int

logger = logging.getLogger(__name__)

KINDS = ("classification", "lm", "instruction")
IGNORE_INDEX = -100  # label value the HF losses skip (padding, prompt tokens)
BATCH_KEYS = ("input_ids", "attention_mask", "labels")

Task = str | int | None


class DataError(ValueError):
    """A bad data file or record: says where (source, line) and what is wrong."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")
        self.source, self.line, self.reason = source, line, reason


class TaskMismatch(DataError):
    """A well-formed file whose record kind the swarm's task cannot train on."""


@dataclass(frozen=True)
class Example:
    """One example as training sees it. Deliberately has no ``task``."""

    text: str | None = None  # classification and lm
    label: int | None = None  # classification
    prompt: str | None = None  # instruction
    completion: str | None = None  # instruction


@dataclass(frozen=True)
class Records:
    """Examples of one kind, plus their task ids kept apart for scoring only."""

    kind: str  # one of KINDS
    examples: tuple[Example, ...]
    tasks: tuple[Task, ...]  # same length as examples; None where the record had none
    source: str = "<memory>"  # file name, for messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Records.kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.tasks) != len(self.examples):
            raise ValueError(f"Records.tasks has {len(self.tasks)} entries for {len(self.examples)} examples")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class labels (classification only)."""
        if self.kind != "classification":
            raise ValueError(f"records of kind {self.kind!r} have no labels")
        return np.array([ex.label for ex in self.examples], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Records:
        idx = [int(i) for i in indices]
        return Records(self.kind, tuple(self.examples[i] for i in idx), tuple(self.tasks[i] for i in idx), self.source)


# -- parsing ------------------------------------------------------------------------
def _record_kind(obj: dict, source: str, line: int) -> str:
    has_instr = "prompt" in obj or "completion" in obj
    if has_instr:
        if "text" in obj or "label" in obj:
            raise DataError(source, line, "record mixes 'prompt'/'completion' with 'text'/'label'")
        for name in ("prompt", "completion"):
            if name not in obj:
                raise DataError(source, line, f"instruction record is missing field '{name}'")
        return "instruction"
    if "text" not in obj:
        raise DataError(source, line, "missing field 'text' (or 'prompt' and 'completion')")
    return "classification" if "label" in obj else "lm"


def _string_field(obj: dict, name: str, source: str, line: int) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(source, line, f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, line, f"field '{name}' is empty")
    return value


def parse_record(obj: object, source: str = "<memory>", line: int | None = None) -> tuple[str, Example, Task]:
    """Validate one decoded JSON value; return (kind, example, task)."""
    if not isinstance(obj, dict):
        raise DataError(source, line, f"record must be a JSON object, got {type(obj).__name__}")
    kind = _record_kind(obj, source, line)
    if kind == "instruction":
        example = Example(
            prompt=_string_field(obj, "prompt", source, line),
            completion=_string_field(obj, "completion", source, line),
        )
    else:
        text = _string_field(obj, "text", source, line)
        label = None
        if kind == "classification":
            label = obj["label"]
            if not is_int(label):
                raise DataError(source, line, f"field 'label' must be an int, got {label!r}")
            if label < 0:
                raise DataError(source, line, f"field 'label' must be >= 0, got {label}")
        example = Example(text=text, label=label)
    task = obj.get("task")
    if task is not None and not (is_int(task) or isinstance(task, str)):
        raise DataError(source, line, f"field 'task' must be a string or an int, got {task!r}")
    return kind, example, task


def records_from_dicts(objs: Iterable[object], source: str = "<memory>", num_labels: int | None = None) -> Records:
    """Build :class:`Records` from decoded JSON values (all of one kind)."""
    return _collect(((i, obj) for i, obj in enumerate(objs, start=1)), source, num_labels)


def load_jsonl(path: str | Path, num_labels: int | None = None) -> Records:
    """Read a JSONL file of one record kind. Blank lines are skipped.

    Raises :class:`DataError` naming the file, the line and the problem for: unreadable
    file, bad UTF-8 or JSON, a non-object line, missing/mistyped fields, a non-int or
    out-of-range label (when ``num_labels`` is given), kinds mixed in one file, or a
    file with no records.
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(source, None, f"cannot read file ({exc.strerror or exc})") from exc

    def decoded() -> Iterator[tuple[int, object]]:
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(source, number, f"not valid UTF-8 ({exc.reason})") from None
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(source, number, f"bad JSON ({exc.msg} at column {exc.colno})") from None

    return _collect(decoded(), source, num_labels)


def _collect(numbered: Iterable[tuple[int, object]], source: str, num_labels: int | None) -> Records:
    kind, first_line = None, None
    examples: list[Example] = []
    tasks: list[Task] = []
    for number, obj in numbered:
        this_kind, example, task = parse_record(obj, source, number)
        if kind is None:
            kind, first_line = this_kind, number
        elif this_kind != kind:
            raise DataError(source, number, f"mixed kinds: this record is {this_kind} but line {first_line} was {kind}")
        if num_labels is not None and example.label is not None and example.label >= num_labels:
            raise DataError(source, number, f"label {example.label} out of range [0, {num_labels})")
        examples.append(example)
        tasks.append(task)
    if kind is None:
        raise DataError(source, None, "no records (empty file)")
    logger.debug("loaded %d %s records from %s", len(examples), kind, source)
    return Records(kind, tuple(examples), tuple(tasks), source)


# -- tokenisation -------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Tokenised examples, unpadded; batches are padded by :func:`collate`.

    ``targets[i]`` is the class id (classification) or a per-token label list the same
    length as ``input_ids[i]`` with IGNORE_INDEX where no loss is taken (lm, instruction).
    """

    kind: str
    input_ids: tuple[tuple[int, ...], ...]
    targets: tuple[int | tuple[int, ...], ...]
    pad_token_id: int
    padding_side: str  # "right" or "left", taken from the tokenizer

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Encoded.kind must be one of {KINDS}, got {self.kind!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"Encoded.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if len(self.targets) != len(self.input_ids):
            raise ValueError(f"Encoded has {len(self.targets)} targets for {len(self.input_ids)} inputs")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) token counts, e.g. for the length-based partition."""
        return np.array([len(ids) for ids in self.input_ids], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Encoded:
        idx = [int(i) for i in indices]
        return Encoded(
            self.kind,
            tuple(self.input_ids[i] for i in idx),
            tuple(self.targets[i] for i in idx),
            self.pad_token_id,
            self.padding_side,
        )


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(records: Records, tokenizer, max_len: int) -> Encoded:
    """Tokenise ``records`` with any HF tokenizer, truncating to ``max_len`` tokens.

    - classification: the tokenizer's own special tokens (e.g. [CLS] .. [SEP]); the
      tail is cut.
    - lm: special tokens, then eos (if the tokenizer has one and did not add it); the
      tail is cut; labels = ids, except IGNORE_INDEX on the first token (nothing
      precedes it, and with left padding a loss would predict it from a pad).
    - instruction: prompt with special tokens, then completion + eos; labels are
      IGNORE_INDEX on the prompt. When too long, the completion keeps up to
      ``max_len - 1`` tokens and the prompt loses tokens from its start.
    """
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    side = getattr(tokenizer, "padding_side", "right")
    eos = tokenizer.eos_token_id
    input_ids: list[tuple[int, ...]] = []
    targets: list[int | tuple[int, ...]] = []
    for ex in records.examples:
        if records.kind == "classification":
            ids = _ids(tokenizer, ex.text, True)[:max_len]
            target: int | tuple[int, ...] = int(ex.label)
        elif records.kind == "lm":
            ids = _ids(tokenizer, ex.text, True)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            ids = ids[:max_len]
            target = (IGNORE_INDEX, *ids[1:])
        else:
            prompt = _ids(tokenizer, ex.prompt, True)
            completion = _ids(tokenizer, ex.completion, False)
            if eos is not None:
                completion.append(eos)
            completion = completion[: max_len - 1]
            prompt = prompt[len(prompt) - min(len(prompt), max_len - len(completion)) :]
            ids = prompt + completion
            target = tuple([IGNORE_INDEX] * len(prompt) + completion)
        if not ids:
            raise DataError(records.source, None, f"an example tokenised to zero tokens: {ex!r}")
        input_ids.append(tuple(int(i) for i in ids))
        targets.append(target)
    return Encoded(records.kind, tuple(input_ids), tuple(targets), int(pad), side)


# -- batching -----------------------------------------------------------------------
def collate(encoded: Encoded, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
    """Pad the chosen examples into one batch on the tokenizer's padding side.

    Returns input_ids (B, T) long, attention_mask (B, T) long and labels: (B,) long for
    classification, (B, T) long with IGNORE_INDEX on padding otherwise. Nothing else.
    """
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("cannot collate an empty batch")
    width = max(len(encoded.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), encoded.pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(idx), width), dtype=torch.long)  # (B, T)
    token_labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, i in enumerate(idx):
        seq = encoded.input_ids[i]
        cols = slice(0, len(seq)) if encoded.padding_side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
        if encoded.kind != "classification":
            token_labels[row, cols] = torch.tensor(encoded.targets[i], dtype=torch.long)
    if encoded.kind == "classification":
        labels = torch.tensor([encoded.targets[i] for i in idx], dtype=torch.long)  # (B,)
    else:
        labels = token_labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iterate_batches(
    encoded: Encoded,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    epochs: int | None = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches; epoch e uses the permutation drawn from ``(seed, e)``.

    ``epochs=None`` cycles forever (the caller stops after its step budget). The order
    depends only on (seed, epoch, len(encoded)), so two runs with one seed see the same
    batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 0):
        raise ValueError(f"epochs must be None or an int >= 0, got {epochs!r}")
    n = len(encoded)
    if n == 0:
        raise ValueError("cannot batch an empty dataset")
    if drop_last and n < batch_size:
        raise ValueError(f"drop_last with batch_size {batch_size} > dataset size {n} yields nothing")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield collate(encoded, order[start : start + batch_size])
        epoch += 1


def round_batches(
    encoded: Encoded, batch_size: int, seed: int, round_: int, steps: int
) -> list[dict[str, torch.Tensor]]:
    """The batches of round ``round_``: steps r*E .. r*E+E-1 (E = ``steps``) of one seeded endless stream.

    Both sides of a replayed round (and a restarted node) get the same batches: the stream
    depends only on (seed, len(encoded)).
    """
    stream = iterate_batches(encoded, batch_size, seed=seed, shuffle=True, epochs=None)
    return list(itertools.islice(stream, round_ * steps, (round_ + 1) * steps))


# -- a swarm's data ------------------------------------------------------------------
DATA_KINDS_FOR_TASK = {"seq_cls": ("classification",), "causal_lm": ("lm", "instruction")}


def load_for_task(path: str | Path, tokenizer, task: str, num_labels: int | None, max_len: int) -> Encoded:
    """Records of ``path`` encoded for a swarm of ``task`` (seq_cls or causal_lm).

    TaskMismatch when the file's record kind does not fit the task (classification records
    for seq_cls; lm or instruction records for causal_lm). Labels are checked against
    ``num_labels`` for seq_cls only.
    """
    records = load_jsonl(path, num_labels=num_labels if task == "seq_cls" else None)
    if records.kind not in DATA_KINDS_FOR_TASK[task]:
        raise TaskMismatch(str(path), None, f"{records.kind} records do not fit the swarm's task {task}")
    return encode(records, tokenizer, max_len)
