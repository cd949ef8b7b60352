"""Held-out evaluation of a node's model: accuracy (seq_cls) or perplexity (causal_lm).

The eval examples are cut in order into batches of the training batch size (no shuffle,
the last batch may be short), so every evaluation of one file sees the same batches.
Accuracy is the share of examples whose argmax logit is the label; perplexity is
exp(mean per-example loss), the mean capped at 50 so a diverged model stays finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from atlas_p2p.data import Encoded, collate
from atlas_p2p.models import unsplit_forward

__all__ = ["eval_batches", "evaluate"]


def eval_batches(encoded: Encoded, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``encoded`` in order, as padded batches of at most ``batch_size`` examples."""
    n = len(encoded)
    return [collate(encoded, range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def evaluate(model: nn.Module, encoded: Encoded, task: str, batch_size: int) -> dict[str, Any]:
    """{"metric", "value", "loss"} of ``model`` on ``encoded``: accuracy or perplexity (module doc)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for batch in eval_batches(encoded, batch_size):
            loss, logits = unsplit_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            n = batch["input_ids"].shape[0]
            loss_sum += float(loss) * n
            total += n
            if task == "seq_cls":
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    if task == "seq_cls":
        return {"metric": "accuracy", "value": correct / max(total, 1), "loss": loss_sum / max(total, 1)}
    mean = loss_sum / max(total, 1)
    return {"metric": "perplexity", "value": math.exp(min(mean, 50.0)), "loss": mean}
