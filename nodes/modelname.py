"""Model and tokenizer by name, the same on every node and on the bootstrap.

`tiny-gpt2`, `tiny-llama`, `tiny-bert` are the embedded defaults: a small random model
built from a config (atlas_p2p.models.tiny_model, seed 0) over the synthetic word-level
tokenizer, so every process builds identical weights and nothing is downloaded. Any other
name goes through load_model / load_tokenizer (an HF id where the hub is reachable, or a
local path).
"""

from __future__ import annotations

from nodes.executor import TORCH_LOCK
from nodes.runtime_config import EMBEDDED_MODELS

EMBEDDED_SEED = 0  # every node builds the same embedded base
# tiny_model seeds torch's global RNG inside fork_rng: builds take turns with every other
# torch job of this process (nodes/executor.py explains why).


def build_tokenizer(name: str):
    if name in EMBEDDED_MODELS:
        from atlas_p2p.synthetic import synthetic_tokenizer

        return synthetic_tokenizer()
    from atlas_p2p.models import load_tokenizer

    tok = load_tokenizer(name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(name: str, task: str, num_labels: int | None, device: str = "cpu"):
    """The plain base model (no adapters) the swarm trains."""
    if name in EMBEDDED_MODELS:
        from atlas_p2p.models import tiny_model

        family = EMBEDDED_MODELS[name]
        if family == "bert" and task != "seq_cls":
            raise ValueError(f"model {name!r} supports task seq_cls only, the swarm runs {task}")
        vocab = len(build_tokenizer(name))
        with TORCH_LOCK:
            return tiny_model(family, task, vocab, num_labels=num_labels, seed=EMBEDDED_SEED).to(device)
    from atlas_p2p.models import load_model

    return load_model(name, task, num_labels=num_labels, device=device)


def model_config(name: str, task: str, num_labels: int | None):
    """The HF config of the swarm's model (the bootstrap plans with it)."""
    if name in EMBEDDED_MODELS:
        return build_model(name, task, num_labels).config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)
