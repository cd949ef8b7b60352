"""Where an adapted module or a dense head tensor sits in a (peft-wrapped) model.

Module names are the Hugging Face names used everywhere in ATLAS
(``model.layers.3.self_attn.q_proj``); dense trainables are named like
``lora.get_dense_trainables`` names them (``score.weight``). The *base* of a dense trainable is
the frozen original tensor (peft's ``ModulesToSaveWrapper.original_module``, or the module
itself on a plain model); merged head changes are folded into it, and each round's trainable
copy restarts from it.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from atlas_p2p.models import SEQ_CLS, family_of, num_layers, unwrap

__all__ = [
    "adapted_modules",
    "dense_base_param",
    "head_params",
    "layer_of",
    "lora_params",
    "reset_head",
    "side_of",
    "weight_shape",
]


def layer_of(model: nn.Module, module_name: str) -> int | None:
    """Block index of ``module_name`` (``...layers.3.self_attn.q_proj`` -> 3); None outside the blocks."""
    prefix = family_of(model).blocks_path() + "."
    if not module_name.startswith(prefix):
        return None
    head = module_name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def side_of(model: nn.Module, module_name: str, split: int) -> str:
    """``"owner"`` for a module in blocks[:split], ``"helper"`` for blocks[split:]; ValueError otherwise."""
    layer = layer_of(model, module_name)
    if layer is None or layer >= num_layers(model):
        raise ValueError(f"module {module_name!r} is not inside a transformer block")
    return "owner" if layer < split else "helper"


def weight_shape(model: nn.Module, module_name: str) -> tuple[int, int]:
    """(d_out, d_in) of the frozen weight of a Linear/Conv1D (LoRA-wrapped or not)."""
    hf = unwrap(model)
    try:
        module = hf.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"module {module_name!r}: no such module in {type(hf).__name__}") from None
    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    if isinstance(module, nn.Linear):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    raise ValueError(f"module {module_name!r} is a {type(module).__name__}, not a Linear/Conv1D")


def dense_base_param(model: nn.Module, name: str) -> torch.nn.Parameter:
    """The frozen base tensor of a dense trainable named ``<module>.<param>`` (e.g. ``score.weight``)."""
    hf = unwrap(model)
    path, _, pname = name.rpartition(".")
    try:
        module = hf.get_submodule(path) if path else None
    except AttributeError:
        module = None
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    param = getattr(module, pname, None) if module is not None else None
    if not isinstance(param, torch.nn.Parameter):
        raise ValueError(f"dense {name!r}: no such parameter in {type(hf).__name__}")
    return param


def lora_params(model: nn.Module, names, adapter_name: str) -> list[torch.nn.Parameter]:
    """The A and B parameters of adapter ``adapter_name`` on the modules ``names`` (in that order)."""
    hf = unwrap(model)
    out = []
    for name in names:
        layer = hf.get_submodule(name)
        out += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
    return out


def adapted_modules(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the modules carrying a LoRA adapter called ``adapter_name``, in model order."""
    return [n for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def head_params(model: nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """The trainable head copy of ``adapter_name`` (``score.weight`` -> parameter); empty if none."""
    out: dict[str, torch.nn.Parameter] = {}
    for name, m in unwrap(model).named_modules():
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save:
            for pname, p in m.modules_to_save[adapter_name].named_parameters():
                out[f"{name}.{pname}"] = p
    return out


def reset_head(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Copy the frozen base head into ``adapter_name``'s trainable copy; return the values (copies)."""
    start = {}
    with torch.no_grad():
        for name, p in head_params(model, adapter_name).items():
            p.copy_(dense_base_param(model, name))
            start[name] = p.detach().clone()
    return start


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's (first) parameters."""
    return next(unwrap(model).parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's (first) parameters."""
    return next(unwrap(model).parameters()).dtype


def num_classes(model: nn.Module, task: str) -> int:
    """Label count a target must stay below: classes for seq_cls, the vocabulary for causal LM."""
    config = unwrap(model).config
    return int(config.num_labels) if task == SEQ_CLS else int(config.vocab_size)
