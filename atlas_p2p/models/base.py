"""One base per swarm: seeded values for freshly created parameters, and the base digest.

A checkpoint rarely holds every parameter the swarm's model needs: a classification head
is created by ``AutoModelForSequenceClassification``, a pooler may be absent, a head of
another size is dropped. Transformers draws those from the process's global RNG, so two
nodes loading the same checkpoint would run different models. Here each such tensor is
drawn from its own generator instead:

    seed(name) = first 63 bits of sha256("<swarm seed>/<name>")
    weight ~ N(0, sigma^2)  with sigma = config.initializer_range (0.02 when absent)
    bias = 0;  norm weight = 1, norm bias = 0;  an embedding's padding row = 0

drawn on the CPU in float32 by a fresh ``torch.Generator(seed(name))``, then cast and
copied into place. Nothing depends on thread count, what the process drew before, or the
device, so every node and helper holds bit-identical tensors.

The *base digest* names the exact weights a node runs:

    sha256( revision, then for each state-dict entry in name order:
            name, dtype, shape, raw bytes )

Two nodes with the same digest run the same base; the bootstrap keeps the swarm's digest
and refuses a node with another one (``mismatch_message`` words the refusal).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from atlas_p2p.validation import require_int

DEFAULT_STD = 0.02  # initializer_range of most Hugging Face configs
SHORT = 12  # hex digits shown for a digest in tables and logs


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one fresh tensor: 63 bits of sha256("<seed>/<name>")."""
    require_int("seed", seed, 0)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def fresh_names(loading_info: dict) -> set[str]:
    """Names a checkpoint did not provide: its missing keys plus keys whose size did not match.

    ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` returns;
    mismatched entries are tuples whose first item is the name.
    """
    names = set(loading_info.get("missing_keys") or ())
    for entry in loading_info.get("mismatched_keys") or ():
        names.add(entry[0] if isinstance(entry, (tuple, list)) else entry)
    return names


def _init_std(config) -> float:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    std = getattr(text, "initializer_range", None) or getattr(config, "initializer_range", None)
    return float(std) if std else DEFAULT_STD


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def seeded_init_(model: nn.Module, names: Iterable[str], seed: int, std: float | None = None) -> dict[str, str]:
    """Overwrite the parameters ``names`` of ``model`` with values drawn from ``seed`` (module doc).

    A name that is not a parameter (a buffer) or that shares its storage with a parameter
    the checkpoint did provide (tied weights) is left alone. Returns {name: rule applied}
    with rule one of ``normal``, ``zeros``, ``ones``.
    """
    wanted = set(names)
    sigma = _init_std(model.config) if std is None and hasattr(model, "config") else (std or DEFAULT_STD)
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    applied: dict[str, str] = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in sorted(wanted):
        param = params.get(name)
        if param is None or any(other not in wanted for other in aliases[id(param)]):
            continue
        module, attr = _owner(model, name)
        is_norm = "norm" in type(module).__name__.lower()
        if attr == "bias" or (is_norm and attr != "weight"):
            rule, value = "zeros", torch.zeros(param.shape, dtype=torch.float32)
        elif is_norm:
            rule, value = "ones", torch.ones(param.shape, dtype=torch.float32)
        else:
            gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
            rule = "normal"
            value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, sigma, generator=gen)
            padding = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and padding is not None:
                value[padding] = 0.0
        with torch.no_grad():
            param.copy_(value.to(dtype=param.dtype))
        applied[name] = rule
    return applied


def base_digest(model: nn.Module, revision: str) -> str:
    """sha256 hex of the revision and every state-dict entry (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256()
    h.update(f"atlas-base-v1\0{revision}\0".encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def short(digest: str | None) -> str:
    """The first hex digits of a digest, as shown in tables and logs."""
    return "-" if not digest else digest[:SHORT]


def mismatch_message(model: str, swarm_digest: str, node_digest: str) -> str:
    """One line refusing a node whose base differs from the swarm's, with the usual causes."""
    return (
        f"base digest {short(node_digest)} of model {model!r} differs from the swarm's {short(swarm_digest)}: "
        "the node runs other weights (another checkpoint or revision under the same name, another "
        "dtype, another transformers version, or a head not drawn from the swarm's init seed); "
        "give every node the same checkpoint files"
    )
