"""LoRA through peft: per-module ranks, adapter tensors in and out, PEFT directory export.

A LoRA adapter on a frozen weight W (d_out x d_in) adds ``γ B A`` with A (r x d_in), B (d_out x r)
and scaling γ = α / r (Hu et al., LoRA, 2021). ATLAS gives each module its own rank r (0 = no
adapter) and its own α through peft's ``rank_pattern``/``alpha_pattern``, keyed by the exact,
regex-escaped full module name so that no pattern can catch a neighbour.

Module names are always relative to the Hugging Face model (``model.layers.0.self_attn.q_proj``),
the same on a plain and on a peft-wrapped model. GPT-2 ``Conv1D`` stores its weight (d_in, d_out);
peft handles it with ``fan_in_fan_out`` and every function here speaks (d_out, d_in).

Initialisation (as peft does it): A ~ kaiming-uniform(a=√5), B = 0, so a fresh adapter changes
nothing. Our A is drawn from a generator seeded by (seed, module name) alone, so every node that
hosts a module draws the same A whatever else it hosts (the fingerprint probe relies on it).

Named adapters: one peft model can hold several adapters side by side (a helper keeps one per
owner it serves). Every function that reads or writes adapter tensors takes ``adapter_name``
(default ``"default"``, the one adapter of an ordinary node); ``add_lora_adapter`` adds another.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from atlas_p2p.aggregation.factors import AdapterFactors
from atlas_p2p.layouts import LORA_KINDS
from atlas_p2p.models.families import family_of, task_of, unwrap
from atlas_p2p.models.loading import save_base  # noqa: F401  (re-exported: base + adapter make a checkpoint)
from atlas_p2p.models.sharing import own_
from atlas_p2p.validation import require_int, require_number

logger = logging.getLogger(__name__)

ADAPTER = "default"  # the one peft adapter name ATLAS uses


def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv1D."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


# ---- targets and attaching ---------------------------------------------------------------


def lora_targets(model: nn.Module, layers=None, kinds: tuple[str, ...] = ("attn",)) -> list[str]:
    """Full names of LoRA-able linears of ``layers`` (default all blocks) of the given ``kinds``.

    ``kinds`` from ``("attn", "mlp")``: attention q/k/v/o (GPT-2: c_attn, c_proj) and MLP projections.
    """
    family = family_of(model)
    n = len(family.blocks(model))
    if isinstance(kinds, str):
        kinds = (kinds,)
    bad = [k for k in kinds if k not in LORA_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds: {tuple(kinds)!r} must be a non-empty subset of {LORA_KINDS}")
    layers = range(n) if layers is None else list(layers)
    for layer in layers:
        require_int("layers", layer, 0, n - 1)
    return [name for layer in layers for name in family.lora_module_names(layer, tuple(kinds))]


def _validate_ranks(hf: nn.Module, ranks) -> dict[str, int]:
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError(f"ranks: expected a non-empty dict module_name -> rank, got {ranks!r}")
    modules = dict(hf.named_modules())
    for name, r in ranks.items():
        require_int(f"ranks[{name!r}]", r, 0)
        if name not in modules:
            raise ValueError(f"ranks: no module named {name!r} in {type(hf).__name__}")
        module = modules[name]
        if isinstance(module, LoraLayer):  # already adapted by another named adapter
            module = module.get_base_layer()
        if not _adaptable(module):
            raise ValueError(f"ranks: {name!r} is a {type(modules[name]).__name__}, not a Linear/Conv1D")
    positive = {n: r for n, r in ranks.items() if r > 0}
    if not positive:
        raise ValueError("ranks: every rank is 0; at least one module needs an adapter")
    return positive


def _alphas(positive: dict[str, int], alpha) -> dict[str, float]:
    if alpha is None:
        return {n: float(r) for n, r in positive.items()}  # α = r, γ = 1
    if isinstance(alpha, dict):
        missing = sorted(set(positive) - set(alpha))
        if missing:
            raise ValueError(f"alpha: no value for modules {missing}")
        out = {n: alpha[n] for n in positive}
    else:
        out = {n: alpha for n in positive}
    for name, a in out.items():
        require_number(f"alpha[{name!r}]", a, positive=True)
    return {n: float(a) for n, a in out.items()}


def _check_adapter_name(adapter_name) -> str:
    if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", adapter_name):
        raise ValueError(f"adapter_name: {adapter_name!r} must be a non-empty string of letters, digits, _ or -")
    return adapter_name


def _lora_config(hf: nn.Module, ranks, alpha, dropout, modules_to_save) -> tuple[LoraConfig, dict[str, int]]:
    """Validated peft config for per-module ranks; also returns the positive ranks."""
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout: {dropout!r} must lie in [0, 1)")
    family = family_of(hf)
    positive = _validate_ranks(hf, ranks)
    alphas = _alphas(positive, alpha)
    if modules_to_save is None:
        modules_to_save = list(family.trainable_head.get(task_of(hf), ()))
    modules = dict(hf.named_modules())
    for name in modules_to_save:
        if name not in modules:
            raise ValueError(f"modules_to_save: no module named {name!r}")
    return LoraConfig(
        r=max(positive.values()),
        lora_alpha=max(alphas.values()),
        target_modules=sorted(positive),
        rank_pattern={re.escape(n): r for n, r in positive.items()},
        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
        lora_dropout=float(dropout),
        fan_in_fan_out=family.conv1d,
        bias="none",
        modules_to_save=list(modules_to_save) or None,
    ), positive


def attach_lora(
    model: nn.Module,
    ranks: dict[str, int],
    alpha: float | dict[str, float] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    modules_to_save: list[str] | None = None,
    adapter_name: str = ADAPTER,
) -> PeftModel:
    """Wrap ``model`` with peft LoRA adapters of per-module ``ranks`` (0 = no adapter there).

    ``alpha`` None gives α = r (γ = 1); a number gives the same α everywhere; a dict gives α per
    module. For ``seq_cls`` the classification head is trained and saved (``modules_to_save``
    defaults to the family's head; pass ``[]`` to keep it frozen). The model is modified in
    place, as peft does; validation happens before anything changes.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model: already wraps peft adapters; attach to the plain model")
    _check_adapter_name(adapter_name)
    hf = unwrap(model)
    config, positive = _lora_config(hf, ranks, alpha, dropout, modules_to_save)
    peft_model = get_peft_model(hf, config, adapter_name=adapter_name)
    reset_adapters(peft_model, seed, adapter_name=adapter_name)
    logger.info("attached LoRA to %d modules (ranks %s)", len(positive), sorted(set(positive.values())))
    return peft_model


def add_lora_adapter(
    peft_model: PeftModel,
    adapter_name: str,
    ranks: dict[str, int],
    alpha: float | dict[str, float] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    modules_to_save: list[str] | None = None,
) -> None:
    """Add one more named adapter to a peft model (same arguments as :func:`attach_lora`).

    The new adapter is fresh (A from (seed, module name), B = 0) and not active; a trainable head
    named in ``modules_to_save`` gets its own copy, taken from the frozen original head. Validation
    happens before anything changes.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"peft_model: expected a PeftModel, got {type(peft_model).__name__}")
    _check_adapter_name(adapter_name)
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"adapter_name: {adapter_name!r} already exists")
    config, positive = _lora_config(unwrap(peft_model), ranks, alpha, dropout, modules_to_save)
    peft_model.add_adapter(adapter_name, config)
    reset_adapters(peft_model, seed, adapter_name=adapter_name)
    logger.debug("added adapter %s on %d modules", adapter_name, len(positive))


def reset_adapters(peft_model: nn.Module, seed: int, adapter_name: str = ADAPTER) -> None:
    """Fresh adapters at the current ranks: A kaiming-uniform from (seed, module name), B = 0."""
    for name, layer in _lora_layers(peft_model, adapter_name).items():
        a = layer.lora_A[adapter_name].weight
        gen = torch.Generator().manual_seed(_module_seed(seed, name))
        fresh = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        with torch.no_grad():
            a.copy_(fresh)
            layer.lora_B[adapter_name].weight.zero_()


# ---- adapter tensors in and out -------------------------------------------------------------


def _lora_layers(model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, LoraLayer]:
    hf = unwrap(model)
    return {name: m for name, m in hf.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def get_factors(peft_model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, AdapterFactors]:
    """Copies of every adapter: module name -> AdapterFactors(A (r, d_in), B (d_out, r), scaling)."""
    return {
        name: AdapterFactors(
            layer.lora_A[adapter_name].weight.detach().clone(),
            layer.lora_B[adapter_name].weight.detach().clone(),
            float(layer.scaling[adapter_name]),
        )
        for name, layer in _lora_layers(peft_model, adapter_name).items()
    }


def set_factors(peft_model: nn.Module, factors: dict[str, AdapterFactors], adapter_name: str = ADAPTER) -> None:
    """Load adapter factors (any subset of modules). Shapes, dtypes and scalings must match the
    attached adapters exactly; on any mismatch a ValueError names it and nothing changes."""
    layers = _lora_layers(peft_model, adapter_name)
    if not isinstance(factors, dict):
        raise ValueError(f"factors: expected a dict module_name -> AdapterFactors, got {type(factors).__name__}")
    for name, f in factors.items():
        if name not in layers:
            raise ValueError(f"factors: {name!r} has no LoRA adapter (adapted: {len(layers)} modules)")
        if not isinstance(f, AdapterFactors):
            raise ValueError(f"factors[{name!r}]: expected AdapterFactors, got {type(f).__name__}")
        layer = layers[name]
        for part, tensor, param in (
            ("A", f.A, layer.lora_A[adapter_name].weight),
            ("B", f.B, layer.lora_B[adapter_name].weight),
        ):
            if tensor.shape != param.shape:
                raise ValueError(f"factors[{name!r}].{part}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
            if tensor.dtype != param.dtype:
                raise ValueError(f"factors[{name!r}].{part}: dtype {tensor.dtype} != {param.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"factors[{name!r}].{part}: contains NaN or infinite values")
        expected = float(layer.scaling[adapter_name])
        if not math.isclose(f.scaling, expected, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(f"factors[{name!r}].scaling: {f.scaling} != attached scaling {expected}")
    with torch.no_grad():
        for name, f in factors.items():
            layers[name].lora_A[adapter_name].weight.copy_(f.A)
            layers[name].lora_B[adapter_name].weight.copy_(f.B)


def _dense_params(peft_model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.nn.Parameter]:
    hf = unwrap(peft_model)
    out: dict[str, torch.nn.Parameter] = {}
    for name, m in hf.named_modules():
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            for pname, p in m.modules_to_save[adapter_name].named_parameters():
                out[f"{name}.{pname}"] = p
    return out


def get_dense_trainables(peft_model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """Copies of the dense trainable tensors (the classification head): ``score.weight`` -> tensor."""
    return {k: p.detach().clone() for k, p in _dense_params(peft_model, adapter_name).items()}


def set_dense_trainables(peft_model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = ADAPTER) -> None:
    """Load dense trainable tensors (any subset); shape/dtype checked before anything changes."""
    params = _dense_params(peft_model, adapter_name)
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors: expected a dict name -> tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        if name not in params:
            raise ValueError(f"tensors: {name!r} is not a dense trainable (have {sorted(params)})")
        if not isinstance(t, torch.Tensor) or t.shape != params[name].shape or t.dtype != params[name].dtype:
            want = f"shape {tuple(params[name].shape)} dtype {params[name].dtype}"
            raise ValueError(f"tensors[{name!r}]: expected {want}, got {_describe(t)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensors[{name!r}]: contains NaN or infinite values")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


# ---- the frozen base --------------------------------------------------------------------------


def _base_layer(model: nn.Module, module_name: str) -> nn.Module:
    modules = dict(unwrap(model).named_modules())
    if module_name not in modules:
        raise ValueError(f"module_name: no module named {module_name!r}")
    module = modules[module_name]
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    if not _adaptable(module):
        raise ValueError(f"module_name: {module_name!r} is a {type(module).__name__}, not a Linear/Conv1D")
    return module


def base_weight(model: nn.Module, module_name: str) -> torch.Tensor:
    """Copy of the frozen base weight of a module, oriented (d_out, d_in) (Conv1D transposed)."""
    module = _base_layer(model, module_name)
    w = module.weight.detach()
    return (w.t() if isinstance(module, Conv1D) else w).clone()


def add_delta_to_base(model: nn.Module, module_name: str, delta) -> None:
    """Fold a dense update into the frozen base weight: ``W <- W + delta``, delta (d_out, d_in).

    Accepts a torch tensor or numpy array of any float dtype (cast to the weight's dtype).
    Works on a plain or peft-wrapped model; adapters are untouched. A weight that views a
    shared base (atlas_p2p.models.sharing) is first given its own copy: only this model changes.
    """
    module = _base_layer(model, module_name)
    if isinstance(delta, np.ndarray):
        delta = torch.from_numpy(np.ascontiguousarray(delta))
    if not isinstance(delta, torch.Tensor) or not delta.dtype.is_floating_point:
        raise ValueError(f"delta: expected a floating tensor, got {_describe(delta)}")
    expected = _out_in(module)
    if tuple(delta.shape) != expected:
        raise ValueError(f"delta: shape {tuple(delta.shape)} != (d_out, d_in) {expected} of {module_name!r}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta: contains NaN or infinite values")
    w = module.weight
    d = delta.to(device=w.device, dtype=w.dtype)
    own_(w)
    with torch.no_grad():
        w.add_(d.t() if isinstance(module, Conv1D) else d)


# ---- export ----------------------------------------------------------------------------------


def save_peft_dir(peft_model: PeftModel, path: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (loadable by
    ``PeftModel.from_pretrained(base, path)``, base being the model the adapters sit on).

    Embedding layers are never saved: ATLAS adapts linears and the head only, and peft's
    "auto" choice would look the base up on the hub (``base_model_name_or_path``) to decide.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"peft_model: expected a PeftModel, got {type(peft_model).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (out / required).is_file():
            raise OSError(f"save_peft_dir: {required} was not written to {out}")
    return out


def load_peft_dir(base: nn.Module, path: str | os.PathLike, trainable: bool = False) -> PeftModel:
    """Load an adapter directory onto ``base`` (inference by default)."""
    return PeftModel.from_pretrained(base, os.fspath(path), is_trainable=trainable)
