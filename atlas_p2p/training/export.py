"""Export a cluster's total update as a standard PEFT LoRA adapter directory.

The cluster's base after v merges is W_v = W_0 + Σ_u B̃_u Ã_u per module (DESIGN 8), one
exact low-rank sum (``VersionedBase.folded_delta``). A PEFT adapter stores it as γ B A per
module, with its own rank r and α per module (peft ``rank_pattern`` / ``alpha_pattern``; we
take α = r, so γ = 1). B and A come from the stacked factors by two thin QRs and a small SVD
(``aggregation.refactor_within``, one SVD for both the rank and the factors), never from the dense matrix.

- Exact (the default): r is the update's numerical rank, the smallest r whose dropped
  singular-value tail sqrt(Σ_{i>r} σ_i²) is at most ``exact_tol / 10`` of ||ΔW||_F, so the
  stored float32 adapter is within ``exact_tol`` (relative Frobenius) of the update.
- Lossy (``rank=R``): r = min(R, numerical rank), the best rank-r approximation
  (Eckart-Young), with its error reported.

The error reported per module is measured on the factors as stored (in the model's dtype):
||ΔW - γ B A||_F, computed in float64 from the stack [B̃ | -γB] [Ã; A] (again QR + small
SVD). The head change (seq_cls) is saved as W_head,0 + Σ_u ΔD_u.

The directory holds ``adapter_config.json`` (``base_model_name_or_path`` names the base) and
``adapter_model.safetensors`` (loadable by ``PeftModel.from_pretrained(original_base, path)``),
``export.json`` (ranks and errors per module, and the prediction check) and ``README.md``, a
model card rendered from an :class:`AdapterCard`. Given a reference model (the node's folded
model) and evaluation batches, the written directory is loaded back with stock
``PeftModel.from_pretrained`` onto a copy of the original base and its predictions are
compared with the reference's (:func:`compare_predictions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from torch import nn

from atlas_p2p.aggregation import (
    AdapterFactors,
    Patch,
    StackedFactors,
    fold_patches,
    refactor_within,
    stacked_singular_values,
)
from atlas_p2p.lora import (
    ADAPTER,
    attach_lora,
    get_dense_trainables,
    save_peft_dir,
    set_dense_trainables,
    set_factors,
)
from atlas_p2p.models.families import task_of
from atlas_p2p.models.sharing import copy_model
from atlas_p2p.validation import is_int, is_number, require_int
from atlas_p2p.versioning import VersionedBase
from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS, TASKS

from .fold import check_patch
from .modules import dense_base_param

__all__ = [
    "EXPORT_CHECK_ROWS",
    "EXPORT_FORMAT",
    "AdapterCard",
    "ExportCheck",
    "ExportReport",
    "FactorMemo",
    "ModuleExport",
    "RoundEval",
    "compare_predictions",
    "export_adapter",
    "render_card",
    "total_update",
    "update_digest",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT = "atlas-export-2"
RANK_TOL_SHARE = 0.1  # the truncation may use this share of exact_tol; float32 storage gets the rest


@dataclasses.dataclass(frozen=True)
class ModuleExport:
    """How well one module's update survived the re-factoring."""

    stacked_rank: int  # Σ of the stacked ranks folded into this module (an upper bound on its rank)
    numerical_rank: int  # rank of the update to the exact tolerance
    rank: int  # rank written to the adapter
    norm: float  # ||ΔW||_F of the exact update
    error: float  # ||ΔW - γ B A||_F of the factors as stored

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """The written adapter, loaded by stock peft onto the original base, against the node's model."""

    examples: int  # evaluation rows compared
    predictions: int  # predictions compared: rows (seq_cls) or real tokens (causal_lm)
    same_predictions: float  # fraction of those whose argmax agrees
    max_abs_logit_diff: float  # max |logit difference| over the compared positions

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What ``export_adapter`` wrote (also saved as export.json)."""

    path: Path
    rank_limit: int | None  # the lossy --export-rank, or None (exact)
    base_version: int | None  # version of the log exported, when a VersionedBase was given
    modules: dict[str, ModuleExport]
    dense: tuple[str, ...]  # head tensors saved with their merged values
    exact_tol: float
    base_model: str | None  # adapter_config.json base_model_name_or_path
    check: ExportCheck | None = None

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules.values()), default=0.0)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules.values()), default=0.0)

    @property
    def exact(self) -> bool:
        """True when every module's relative error is within ``exact_tol``."""
        return self.max_relative_error <= self.exact_tol

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in sorted(self.modules.items())}

    def summary(self) -> dict:
        """The few figures a node's summary.json carries."""
        ranks = list(self.ranks.values())
        return {
            "exact": self.exact,
            "max_error": self.max_error,
            "max_relative_error": self.max_relative_error,
            "base_version": self.base_version,
            "rank_limit": self.rank_limit,
            "base_model": self.base_model,
            "rank_min": min(ranks, default=0),
            "rank_max": max(ranks, default=0),
            "check": None if self.check is None else self.check.to_json(),
        }

    def to_json(self) -> dict:
        return {
            "format": EXPORT_FORMAT,
            "base_model": self.base_model,
            "base_version": self.base_version,
            "rank_limit": self.rank_limit,
            "exact": self.exact,
            "exact_tol": self.exact_tol,
            "max_error": self.max_error,
            "max_relative_error": self.max_relative_error,
            "dense": list(self.dense),
            "modules": {
                name: {**dataclasses.asdict(m), "relative_error": m.relative_error}
                for name, m in sorted(self.modules.items())
            },
            "check": None if self.check is None else self.check.to_json(),
        }


class RoundEval(NamedTuple):
    """One held-out evaluation after a merge round."""

    round: int
    metric: str  # accuracy | perplexity
    value: float


@dataclasses.dataclass(frozen=True)
class AdapterCard:
    """What the model card (README.md of the adapter directory) says about the training run."""

    base_model: str  # the swarm's model: hub id, local path or embedded name
    task: str  # seq_cls | causal_lm
    num_labels: int | None = None  # classes (seq_cls)
    label_names: tuple[str, ...] = ()  # class names by id, when known
    cluster: str | None = None  # the cluster whose update this is
    members: tuple[int, ...] = ()  # node ids of the cluster
    rounds: int = 0  # merge rounds trained
    node_id: int | None = None  # the node that exported
    evals: tuple[RoundEval, ...] = ()  # the exporting node's held-out metric by round
    base_code: str | None = None  # Python that builds `base` (default: transformers from_pretrained)

    def __post_init__(self) -> None:
        if isinstance(self.base_model, os.PathLike):
            object.__setattr__(self, "base_model", os.fspath(self.base_model))
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError(f"base_model: {self.base_model!r} must be a non-empty name or path")
        if self.task not in TASKS:
            raise ValueError(f"task: {self.task!r} must be one of {TASKS}")
        if self.num_labels is not None and (not is_int(self.num_labels) or self.num_labels < 1):
            raise ValueError(f"num_labels: {self.num_labels!r} must be an int >= 1 or None")
        names = tuple(self.label_names)
        if names and (len(names) != self.num_labels or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"label_names: {names!r} must be {self.num_labels} strings (one per label)")
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "members", tuple(int(m) for m in self.members))
        require_int("rounds", self.rounds, 0)
        evals = tuple(RoundEval(int(e[0]), str(e[1]), float(e[2])) for e in self.evals)
        object.__setattr__(self, "evals", evals)


def total_update(update: Patch | VersionedBase | Sequence[Patch]) -> Patch:
    """One exact patch for the whole update: a patch, a log's folded delta, or a list folded in order."""
    if isinstance(update, Patch):
        return update
    if isinstance(update, VersionedBase):
        return update.folded_delta()
    if isinstance(update, Sequence) and not isinstance(update, (str, bytes)):
        if not all(isinstance(p, Patch) for p in update):
            raise ValueError("update: a sequence must hold aggregation.Patch objects only")
        return fold_patches(list(update))
    raise ValueError(f"update: expected a Patch, a VersionedBase or a list of patches, got {type(update).__name__}")


def _as_stacked(patch: Patch, name: str) -> StackedFactors:
    """One module's update as factors: the stacked ones, or a full matrix ΔW as ΔW · I (exact)."""
    if name in patch.modules:
        return patch.modules[name]
    delta = patch.full[name]  # (d_out, d_in)
    return StackedFactors(delta, torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device))


def _norm(sf: StackedFactors) -> float:
    """||B̃ Ã||_F = sqrt(Σ σ_i²)."""
    return float(torch.sqrt(torch.sum(stacked_singular_values(sf).double() ** 2)))


def _refactor(sf: StackedFactors, rank_limit: int | None, exact_tol: float, dtype: torch.dtype):
    """(A, B) of the written rank in ``dtype`` (γ = 1), and the module's ModuleExport."""
    wide = StackedFactors(sf.B.double(), sf.A.double())  # (d_out, R), (R, d_in)
    low, s, exact_rank = refactor_within(wide, exact_tol * RANK_TOL_SHARE, rank_limit)  # one SVD, σ descending
    b, a = low.B.to(dtype), low.A.to(dtype)  # (d_out, r), (r, d_in) as stored
    residual = StackedFactors(torch.cat([wide.B, -b.double()], dim=1), torch.cat([wide.A, a.double()], dim=0))
    return a, b, ModuleExport(sf.rank, exact_rank, b.shape[1], float(torch.sqrt(torch.sum(s**2))), _norm(residual))


def _check_args(original, rank, exact_tol, card, reference) -> None:
    if isinstance(original, PeftModel):
        raise ValueError("original: pass the plain original base model, not a peft model")
    if rank is not None and (not is_int(rank) or rank < 1):
        raise ValueError(f"rank: {rank!r} must be an int >= 1 (lossy) or None (exact)")
    if not is_number(exact_tol) or not 0 <= exact_tol < 1:
        raise ValueError(f"exact_tol: {exact_tol!r} must be a number in [0, 1)")
    if card is not None and not isinstance(card, AdapterCard):
        raise ValueError(f"card: expected an AdapterCard, got {type(card).__name__}")
    if reference is not None and not isinstance(reference, nn.Module):
        raise ValueError(f"reference: expected a torch module, got {type(reference).__name__}")


def update_digest(patch: Patch) -> str:
    """sha256 of a patch's content: module names, shapes, dtypes and bytes of every tensor."""
    h = hashlib.sha256()

    def put(kind: str, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for name in sorted(patch.modules):
        put("B", name, patch.modules[name].B)
        put("A", name, patch.modules[name].A)
    for kind, tensors in (("full", patch.full), ("dense", patch.dense)):
        for name in sorted(tensors):
            put(kind, name, tensors[name])
    return h.hexdigest()


class FactorMemo:
    """The factors of the last ``size`` updates exported in this process, by content.

    In an in-process swarm every member of a cluster exports the same update from the same
    shared base; the truncated SVDs (most of an export's time) then run once per cluster.
    Each member still writes, loads back and checks its own directory.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.hits = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def export_adapter(
    original: nn.Module,
    update: Patch | VersionedBase | Sequence[Patch],
    path: str | os.PathLike,
    rank: int | None = None,
    *,
    exact_tol: float = 1e-5,
    card: AdapterCard | None = None,
    reference: nn.Module | None = None,
    eval_batches: Iterable[Mapping[str, torch.Tensor]] = (),
    memo: FactorMemo | None = None,
) -> ExportReport:
    """Write ``update`` (relative to ``original``) as a PEFT adapter under ``path``.

    ``original`` is the plain original base model (not modified: copies carry the adapter).
    ``rank`` None exports exactly (per-module numerical rank); an int R caps every module at
    R (lossy, error reported). ``card`` names the base and writes README.md (without it the
    base's ``name_or_path`` is used, if any). With ``reference`` (the model the update was
    folded into) and ``eval_batches``, the written directory is loaded back and compared
    (``ExportReport.check``). With ``memo``, an update already factored for the same
    ``original`` (same content, rank and tolerance) is not factored again (``FactorMemo``).
    Everything is checked before anything is written.
    """
    _check_args(original, rank, exact_tol, card, reference)
    patch = total_update(update)
    check_patch(original, patch)
    if not patch.module_names():
        raise ValueError("update: no adapted module to export")
    base_model = card.base_model if card is not None else (getattr(original, "name_or_path", "") or None)
    dtype = next(original.parameters()).dtype
    factors, modules = {}, {}
    key = None if memo is None else (id(original), update_digest(patch), rank, float(exact_tol), str(dtype))
    known = None if memo is None else memo.get(key)
    if known is not None:
        factors, modules = known
    else:
        for name in patch.module_names():
            a, b, modules[name] = _refactor(_as_stacked(patch, name), rank, float(exact_tol), dtype)
            factors[name] = AdapterFactors(a, b, 1.0)  # A (r, d_in), B (d_out, r), γ = α / r = 1
        if memo is not None:
            memo.put(key, (factors, modules))
    peft_model = attach_lora(copy_model(original), {n: m.rank for n, m in modules.items()})  # α = r
    set_factors(peft_model, factors)
    heads = get_dense_trainables(peft_model)
    missing = sorted(set(patch.dense) - set(heads))
    if missing:
        raise ValueError(f"update: head changes {missing} have no trainable head to carry them (have {sorted(heads)})")
    with torch.no_grad():
        merged = {n: dense_base_param(peft_model, n).detach() + d.to(heads[n].dtype) for n, d in patch.dense.items()}
    set_dense_trainables(peft_model, merged)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = base_model
    out = save_peft_dir(peft_model, path)
    del peft_model
    check = None
    if reference is not None:
        loaded = PeftModel.from_pretrained(copy_model(original), os.fspath(out))
        check = compare_predictions(loaded, reference, eval_batches)
        del loaded
    report = ExportReport(
        out,
        rank,
        update.version if isinstance(update, VersionedBase) else None,
        modules,
        tuple(sorted(patch.dense)),
        float(exact_tol),
        base_model,
        check,
    )
    _write_text(out / "export.json", json.dumps(report.to_json(), indent=2, sort_keys=True))
    if card is not None:
        _write_text(out / "README.md", render_card(card, report))
    log.info(
        "exported %s adapter of %d modules (ranks %d..%d) to %s, max relative error %.3g%s",
        "an exact" if report.exact else "a lossy",
        len(modules),
        min(report.ranks.values()),
        max(report.ranks.values()),
        out,
        report.max_relative_error,
        "" if check is None else f", same predictions {check.same_predictions:.4f}",
    )
    return report


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- the prediction check ----------------------------------------------------------------------
# A node checks its export on this many of its evaluation rows: the check is of exactness (the
# stored factors against the folded model), which 64 rows show as well as thousands.
EXPORT_CHECK_ROWS = 64


def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.detach().double().cpu()  # (B, C) or (B, T, V)


def compare_predictions(
    model: nn.Module, reference: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> ExportCheck:
    """Argmax agreement and max |logit difference| of two models on the same batches.

    seq_cls compares one prediction per row; causal_lm compares the next-token prediction at
    every real (attention-mask 1) position. Both models run in eval mode (no dropout) and get
    their previous mode back.
    """
    task = task_of(reference)
    modes = [(m, m.training) for m in (model, reference)]
    examples = predictions = same = 0
    worst = 0.0
    try:
        model.eval(), reference.eval()
        with torch.no_grad():
            for batch in batches:
                got, want = _logits(model, batch), _logits(reference, batch)
                if got.shape != want.shape:
                    raise ValueError(f"the models' logits differ in shape: {tuple(got.shape)} vs {tuple(want.shape)}")
                if task == CAUSAL_LM:
                    keep = batch["attention_mask"].bool().cpu()  # (B, T)
                    got, want = got[keep], want[keep]  # (N, V)
                examples += int(batch["input_ids"].shape[0])
                predictions += int(got.shape[0])
                same += int((got.argmax(-1) == want.argmax(-1)).sum())
                if got.numel():
                    worst = max(worst, float((got - want).abs().max()))
    finally:
        for m, training in modes:
            m.train(training)
    if predictions == 0:
        raise ValueError("batches: nothing to compare (no evaluation rows)")
    return ExportCheck(examples, predictions, same / predictions, worst)


# ---- the model card ---------------------------------------------------------------------------
_TASK_TEXT = {SEQ_CLS: "sequence classification", CAUSAL_LM: "causal language modelling"}
_AUTO_CLASS = {SEQ_CLS: "AutoModelForSequenceClassification", CAUSAL_LM: "AutoModelForCausalLM"}


def _load_snippet(card: AdapterCard) -> str:
    if card.base_code is not None:
        build = card.base_code
    else:
        cls = _AUTO_CLASS[card.task]
        labels = f", num_labels={card.num_labels}" if card.task == SEQ_CLS and card.num_labels else ""
        build = f"from transformers import {cls}\nbase = {cls}.from_pretrained({card.base_model!r}{labels})"
    return f"from peft import PeftModel\n{build}\nmodel = PeftModel.from_pretrained(base, 'path/to/this/adapter')\n"


def render_card(card: AdapterCard, report: ExportReport) -> str:
    """README.md of the adapter directory: what it is, how it was trained, how exact it is, how to load it."""
    task = _TASK_TEXT[card.task]
    if card.task == SEQ_CLS and card.num_labels:
        task += f", {card.num_labels} labels"
        if card.label_names:
            task += " (" + ", ".join(f"{i}: {n}" for i, n in enumerate(card.label_names)) + ")"
    ranks = list(report.ranks.values())
    version = "" if report.base_version is None else f" (base version {report.base_version})"
    rows = [
        ("Base model", f"`{card.base_model}`"),
        ("Task", task),
        ("Cluster", "-" if card.cluster is None else str(card.cluster)),
        ("Members", ", ".join(f"node {m}" for m in card.members) or "-"),
        ("Rounds", f"{card.rounds} merge rounds{version}"),
        ("Exported by", "-" if card.node_id is None else f"node {card.node_id}"),
    ]
    lines = [
        "---",
        f"base_model: {json.dumps(card.base_model)}",
        "library_name: peft",
        "tags: [lora, atlas]",
        "---",
        "",
        f"# LoRA adapter: ATLAS cluster {'-' if card.cluster is None else card.cluster} on {card.base_model}",
        "",
        "The total update of one cluster of an ATLAS swarm (split learning with LoRA): every merge",
        "round folded the members' exact stacked update into the cluster's base, and this adapter",
        "holds the sum of those updates relative to the original base"
        + (", with the trained classification head." if report.dense else "."),
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Evaluation by round",
        "",
    ]
    if card.evals:
        metric = card.evals[0].metric
        lines += [
            f"Held-out {metric} of the exporting node after each merge round.",
            "",
            f"| round | {metric} |",
            "|---|---|",
        ]
        lines += [f"| {e.round} | {e.value:.4f} |" for e in card.evals]
    else:
        lines.append("No held-out evaluation was given to the exporting node.")
    exactness = (
        f"exact: every module at its numerical rank, relative error at most {report.exact_tol:g}"
        if report.rank_limit is None
        else f"lossy: ranks capped at {report.rank_limit} (`--export-rank`)"
    )
    lines += [
        "",
        "## Export",
        "",
        f"- {exactness}; ranks {min(ranks)}..{max(ranks)} over {len(ranks)} modules (per-module `rank_pattern`).",
        f"- Largest relative Frobenius error of a module's update: {report.max_relative_error:.3g}"
        f" ({'exact' if report.exact else 'not exact'}; per module in `export.json`).",
    ]
    if report.dense:
        lines.append(f"- Saved in full: {', '.join(f'`{d}`' for d in report.dense)}.")
    if report.check is not None:
        c = report.check
        lines.append(
            f"- Checked after writing: loaded with `PeftModel.from_pretrained` onto the original base, "
            f"{c.same_predictions:.4f} of {c.predictions} predictions on {c.examples} held-out examples equal "
            f"the trained model's, max |logit difference| {c.max_abs_logit_diff:.3g}."
        )
    lines += ["", "## How to load", "", "```python", _load_snippet(card) + "```", ""]
    return "\n".join(lines)
