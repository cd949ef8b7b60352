"""Running the owner part from chosen input embeddings instead of token ids.

Both meters (leakage.py, inversion.py) need the activations at a split as a function of
the input embeddings e (B, T, H): the vectors the token lookup would produce. The model's
own lookup module is asked for them, and while ``embeddings_as(model, e)`` is active its
output is replaced by ``e``, so every family's own embedding path (positions, token types,
scaling, layer norm) runs after it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from atlas_p2p.models.families import unwrap


def lookup(model: nn.Module) -> nn.Embedding:
    """The model's token-embedding table (B, T) ids -> (B, T, H)."""
    module = unwrap(model).get_input_embeddings()
    if not isinstance(module, nn.Embedding):
        raise ValueError(f"model: input embeddings are a {type(module).__name__}, not an nn.Embedding")
    return module


@contextmanager
def embeddings_as(model: nn.Module, e: torch.Tensor) -> Iterator[None]:
    """Within the block, the token lookup returns ``e`` (B, T, H) whatever ids it is given."""
    table = lookup(model)

    def replace(module, args, out):
        if out.shape != e.shape:
            raise ValueError(f"embeddings: the lookup made {tuple(out.shape)}, e is {tuple(e.shape)}")
        return e.to(out.dtype)

    handle = table.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no parameter gradients inside; modes and flags restored after."""
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in training:
            m.train(mode)
