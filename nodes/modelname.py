"""Model and tokenizer by name, the same on every node and on the bootstrap.

`tiny-gpt2`, `tiny-llama`, `tiny-bert` are the embedded defaults: a small random model
built from a config (atlas_p2p.models.tiny_model, seed 0) over the synthetic word-level
tokenizer, so every process builds identical weights and nothing is downloaded. Any other
name goes through load_model / load_tokenizer (an HF id where the hub is reachable, or a
local path). Parameters a checkpoint lacks (a new head) are drawn from the swarm's
init seed (the bootstrap's welcome), and `base_identity` names the exact base a node runs
(the digest the bootstrap compares, atlas_p2p.models.base).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodes.config import EMBEDDED_MODELS
from nodes.executor import TORCH_LOCK

if TYPE_CHECKING:  # torch is imported when a model is built, not when the CLI starts
    from torch import nn

EMBEDDED_SEED = 0  # every node builds the same embedded base
# tiny_model seeds torch's global RNG inside fork_rng: builds take turns with every other
# torch job of this process (nodes/executor.py explains why).

# shared_model's originals, one per (name, task, num_labels, device, init_seed); read-only
_SHARED_BASES: dict[tuple[str, str, int | None, str, int], nn.Module] = {}
_SHARED_TOKENIZERS: dict[str, object] = {}  # shared_tokenizer's, by model name


def build_tokenizer(name: str):
    if name in EMBEDDED_MODELS:
        from atlas_p2p.synthetic import synthetic_tokenizer

        return synthetic_tokenizer()
    from atlas_p2p.models import load_tokenizer

    tok = load_tokenizer(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def shared_tokenizer(name: str):
    """`build_tokenizer(name)`, built once per process for the nodes of an in-process swarm
    (they only read it: encoding a text changes nothing in it)."""
    with TORCH_LOCK:
        if name not in _SHARED_TOKENIZERS:
            _SHARED_TOKENIZERS[name] = build_tokenizer(name)
        return _SHARED_TOKENIZERS[name]


def build_model(name: str, task: str, num_labels: int | None, device: str = "cpu", init_seed: int = 0):
    """The plain base model (no adapters) the swarm trains.

    Embedded models are fully drawn from EMBEDDED_SEED; a checkpoint's missing
    parameters come from `init_seed` (atlas_p2p.models.base.seeded_init_)."""
    if name in EMBEDDED_MODELS:
        from atlas_p2p.models import tiny_model

        family = EMBEDDED_MODELS[name]
        if family == "bert" and task != "seq_cls":
            raise ValueError(f"model {name!r} supports task seq_cls only, the swarm runs {task}")
        vocab = len(build_tokenizer(name))
        with TORCH_LOCK:
            return tiny_model(family, task, vocab, num_labels=num_labels, seed=EMBEDDED_SEED).to(device)
    from atlas_p2p.models import load_model

    return load_model(name, task, num_labels=num_labels, device=device, init_seed=init_seed)


def shared_model(name: str, task: str, num_labels: int | None, device: str = "cpu", init_seed: int = 0) -> nn.Module:
    """`build_model`'s base for the nodes of one process (the in-process swarm).

    The first call for (name, task, num_labels, device, init_seed) builds the base and keeps
    it as the process's read-only original (atlas_p2p.models.sharing.share_frozen); every call
    returns a structural copy of it: modules and Parameter objects of its own, weights viewing
    the original's storage, written only after a private copy (copy-on-write)."""
    from atlas_p2p.models.sharing import copy_model, share_frozen

    key = (name, task, num_labels, device, init_seed)
    with TORCH_LOCK:
        original = _SHARED_BASES.get(key)
        if original is None:
            original = _SHARED_BASES[key] = share_frozen(build_model(name, task, num_labels, device, init_seed))
        return copy_model(original)


def drop_shared_models() -> None:
    """Forget every shared original and tokenizer: later `shared_model` calls build afresh (copies handed
    out keep the tensors they view alive)."""
    from atlas_p2p.models.sharing import unshare

    with TORCH_LOCK:
        for original in _SHARED_BASES.values():
            unshare(original)
        _SHARED_BASES.clear()
        _SHARED_TOKENIZERS.clear()


def model_config(name: str, task: str, num_labels: int | None):
    """The HF config of the swarm's model (the bootstrap plans with it).

    Raises atlas_p2p.models.ModelLoadError (one line: the model, the cause, what to do)
    when the config cannot be read or names a family or task ATLAS does not run."""
    if name in EMBEDDED_MODELS:
        return build_model(name, task, num_labels).config
    from atlas_p2p.models import load_config

    return load_config(name, task)


def check_model(name: str, task: str | None = None) -> None:
    """Fail early, before joining or binding anything, when `name` cannot be used (ModelLoadError)."""
    if name in EMBEDDED_MODELS:
        if task is not None and EMBEDDED_MODELS[name] == "bert" and task != "seq_cls":
            from atlas_p2p.models import UnsupportedModelError

            raise UnsupportedModelError(f"model {name!r} supports task seq_cls only; use --task seq_cls")
        return
    from atlas_p2p.models import UnsupportedModelError, load_config

    config = load_config(name, task)
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 2:
        raise UnsupportedModelError(
            f"model {name!r} has {layers} transformer block(s); ATLAS splits a model "
            "between blocks and needs at least 2"
        )


def base_identity(model, name: str) -> dict:
    """What names the base a node runs: digest, revision, dtype, and the tensors drawn from the
    init seed (their sums, and a sha256 of each one's bytes: equal hashes, bit-identical heads).

    The digest covers every state-dict entry (atlas_p2p.models.base.base_digest); the
    revision is the model's commit when known, else its name (embedded: name + seed)."""
    import hashlib

    import torch

    from atlas_p2p.models import base_digest, model_revision

    if name in EMBEDDED_MODELS:
        revision = f"{name}@seed{EMBEDDED_SEED}"
    else:
        revision = model_revision(name, model.config)
    with TORCH_LOCK:
        digest = base_digest(model, revision)
        params = dict(model.named_parameters())
        fresh = [n for n in getattr(model, "atlas_fresh_parameters", ()) if n in params]
        sums = {n: float(params[n].detach().double().sum()) for n in fresh}
        hashes = {
            n: hashlib.sha256(params[n].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for n in fresh
        }
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "digest": digest,
        "revision": revision,
        "dtype": dtype,
        "model": name,
        "fresh_sums": sums,
        "fresh_sha256": hashes,
    }
