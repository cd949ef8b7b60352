"""Training losses, shared by the unsplit model and by the helper/tail side of a split.

Causal LM: next-token cross-entropy, logits at t predict the label at t+1,
``L = (1/|K|) Σ_{(b,t) ∈ K} -log softmax(z_{b,t})[y_{b,t+1}]`` where K holds the positions whose
shifted label is not ``IGNORE_INDEX`` (padding, prompt tokens of prompt/completion data), whose
``loss_mask`` is 1 and whose source position t is a real token (a prediction made from a
padding position is not counted, so a left-padded row gives the same loss as its right-padded
twin). With labels from :func:`causal_lm_labels` this is exactly the mean Hugging Face's
causal-LM loss takes.

Sequence classification: cross-entropy of the pooled logits (B, C) against labels (B,), or
mean squared error when the head has a single output (regression).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS, TASKS

IGNORE_INDEX = -100


def causal_lm_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Labels for the causal LM loss: the input ids, ``IGNORE_INDEX`` on padding, where ``loss_mask``
    is 0, and on the first real token of each row (nothing real precedes it to predict it from).

    For prompt/completion data pass ``loss_mask`` = 1 on completion tokens only. (B, T) -> (B, T).
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    keep = attention_mask != 0
    if loss_mask is not None:
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask: shape {tuple(loss_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        keep = keep & (loss_mask != 0)
    first = (attention_mask != 0).long().argmax(-1)  # (B,) index of the first real token
    keep[torch.arange(keep.shape[0], device=keep.device), first] = False
    return input_ids.long().masked_fill(~keep, IGNORE_INDEX)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted next-token loss, mean over counted tokens. logits (B, T, V), labels/masks (B, T).

    A batch with no counted token gives a zero that still depends on the logits (so backward runs).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels: dtype {labels.dtype} must be an integer type (token ids or {IGNORE_INDEX})")
    target = labels[:, 1:].long()  # (B, T-1)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask: shape {tuple(loss_mask.shape)} != labels {tuple(labels.shape)}")
        target = target.masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != labels {tuple(labels.shape)}")
        target = target.masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)  # source is padding
    vocab = logits.shape[-1]
    if bool(((target != IGNORE_INDEX) & ((target < 0) | (target >= vocab))).any()):
        raise ValueError(f"labels: token ids must lie in 0..{vocab - 1} or be {IGNORE_INDEX}")
    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    counted = (target != IGNORE_INDEX).sum()
    if counted == 0:
        return pred.sum() * 0.0
    total = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / counted


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for (B, C) logits with C > 1 and long labels (B,); MSE when C == 1."""
    if logits.dim() != 2 or labels.shape[:1] != logits.shape[:1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return F.mse_loss(logits.float().squeeze(-1), labels.float().reshape(-1))
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels: dtype {labels.dtype} must be an integer class index")
    if labels.dim() != 1:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must be (B,)")
    c = logits.shape[1]
    if bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(f"labels: values must lie in 0..{c - 1}, got {labels.tolist()}")
    return F.cross_entropy(logits.float(), labels.long())


def task_loss(
    task: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of ``task`` (``causal_lm`` or ``seq_cls``) for the head's logits."""
    if task == CAUSAL_LM:
        return causal_lm_loss(logits, labels, loss_mask, attention_mask)
    if task == SEQ_CLS:
        return classification_loss(logits, labels)
    raise ValueError(f"task: {task!r} is not one of {TASKS}")
