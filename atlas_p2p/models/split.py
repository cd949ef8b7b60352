"""Split a model on its own block list into the parts that run on different devices.

Two-part split at layer s (SplitLoRA's client/server cut):

    owner  : embeddings + blocks[:s]                     (input_ids, mask) -> hidden (B, T, H)
    helper : blocks[s:] + final norm + head + loss       (hidden, mask, labels) -> (loss, logits)

U-shape split (labels never leave the owner), cuts at s <= t:

    owner front : embeddings + blocks[:s]
    helper      : blocks[s:t]                            (hidden, mask) -> hidden
    owner tail  : blocks[t:] + final norm + head + loss  (:class:`UShapeHead`)

Every part holds the original modules (no copies): training a part trains the model, and a
part built from a peft-wrapped model runs its LoRA adapters. Only the 2-D attention mask
travels between parts; each part rebuilds positions, rotary tables and the backend mask from
it (``Family.context``), so composing the parts equals the unsplit model.

Backward across a cut is what the network does: the receiving side marks the incoming hidden
states ``h.requires_grad_()``, runs its part and ``loss.backward()``; the sending side then
calls ``h_sent.backward(h.grad)``.

Split after attaching LoRA (``attach_lora``) so that ``parameters()`` of a part lists the
trainable head copy peft creates.
"""

from __future__ import annotations

import torch
from torch import nn

from atlas_p2p.models.families import BlockContext, family_of, task_of, unwrap
from atlas_p2p.models.losses import task_loss
from atlas_p2p.validation import is_int
from atlas_p2p.vocabulary import SEQ_CLS, SPLIT_MODES


def _check_ids(input_ids: torch.Tensor, vocab_size: int, max_length: int | None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids: expected a non-empty (B, T) tensor, got {_describe(input_ids)}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"input_ids: length {input_ids.shape[1]} exceeds the model's {max_length} positions")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise ValueError(f"input_ids: dtype {input_ids.dtype} must be an integer type")
    if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(f"input_ids: token ids must lie in 0..{vocab_size - 1}")


def _check_mask(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask: expected shape ({batch}, {length}), got {_describe(attention_mask)}")
    if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
        raise ValueError(f"attention_mask: dtype {attention_mask.dtype} must be integer or bool")
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask: values must be 0 or 1")
    return attention_mask.to(device=device, dtype=torch.long)


def _max_length(hf: nn.Module) -> int | None:
    if not family_of(hf).learned_positions:
        return None
    return int(hf.config.max_position_embeddings)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class _Part(nn.Module):
    """Common plumbing: blocks[start:stop] of a model, shared not copied."""

    def __init__(self, model: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        hf = unwrap(model)
        self.__dict__["_model"] = hf  # plain reference, not a submodule: a part owns only its slice
        self.family = family_of(hf)
        self.task = task_of(hf)
        self.start, self.stop = start, stop
        self.hidden_size = int(hf.config.hidden_size)
        self.blocks = nn.ModuleList(list(self.family.blocks(hf))[start:stop])
        self.context_modules = nn.ModuleDict(self.family.context_modules(hf))

    @property
    def model(self) -> nn.Module:
        """The (unwrapped) Hugging Face model this part belongs to."""
        return self.__dict__["_model"]

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Validate activations received from a peer; return them on the model's device."""
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or hidden.shape[-1] != self.hidden_size
            or 0 in hidden.shape
        ):
            raise ValueError(f"hidden: expected a non-empty (B, T, {self.hidden_size}) tensor, got {_describe(hidden)}")
        if hidden.dtype != self._param_dtype():
            raise ValueError(f"hidden: dtype {hidden.dtype} != model dtype {self._param_dtype()}")
        if not bool(torch.isfinite(hidden).all()):
            raise ValueError("hidden: contains NaN or infinite values")
        return hidden.to(self._device())

    def _max_length(self) -> int | None:
        return _max_length(self.model)

    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> BlockContext:
        return self.family.context(self.model, hidden, attention_mask)

    def _run_blocks(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        for index, block in enumerate(self.blocks, start=self.start):
            hidden = self.family.run_block(block, index, hidden, ctx)  # (B, T, H)
        return hidden


class OwnerPart(_Part):
    """Embeddings + blocks[:s]: ``forward(input_ids, attention_mask) -> hidden (B, T, H)``."""

    def __init__(self, model: nn.Module, s: int) -> None:
        super().__init__(model, 0, s)
        self.embeddings = nn.ModuleDict(self.family.embedding_modules(self.model))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_ids(input_ids, int(self.model.config.vocab_size), self._max_length())
        input_ids = input_ids.to(self._device())
        mask = _check_mask(attention_mask, input_ids.shape[0], input_ids.shape[1], input_ids.device)
        probe = torch.empty(*input_ids.shape, 0, dtype=self._param_dtype(), device=input_ids.device)
        ctx = self._context(probe, mask)  # masks only need (B, T) and the dtype
        hidden = self.family.embed(self.model, input_ids, ctx)  # (B, T, H)
        return self._run_blocks(hidden, ctx)


class MiddlePart(_Part):
    """blocks[start:stop] (the helper of a u-shape split): ``forward(hidden, mask) -> hidden``."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self._check_hidden(hidden)
        mask = _check_mask(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
        return self._run_blocks(hidden, self._context(hidden, mask))


class HelperPart(_Part):
    """blocks[s:] + final norm + head + loss.

    ``forward(hidden, attention_mask, labels=None, loss_mask=None) -> (loss | None, logits)``;
    logits are (B, T, V) for causal LM and (B, C) for classification. ``labels`` are the
    shifted-loss labels of :func:`causal_lm_labels` (B, T) or class ids (B,); without labels
    the loss is None.
    """

    def __init__(self, model: nn.Module, s: int) -> None:
        super().__init__(model, s, None)
        norm = self.family.final_norm(self.model)
        self.final_norm = norm if norm is not None else nn.Identity()
        self.head = nn.ModuleDict(self.family.head_modules(self.model, self.task))

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        hidden = self._check_hidden(hidden)
        mask = _check_mask(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
        if loss_mask is not None:
            loss_mask = _check_mask(loss_mask, hidden.shape[0], hidden.shape[1], hidden.device)
        ctx = self._context(hidden, mask)
        hidden = self.final_norm(self._run_blocks(hidden, ctx))  # (B, T, H)
        logits = self.family.head(self.model, self.task, hidden, ctx)
        if labels is None:
            return None, logits
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"labels: expected a tensor, got {_describe(labels)}")
        return task_loss(self.task, logits, labels.to(logits.device), loss_mask, mask), logits


class UShapeHead(HelperPart):
    """Owner tail of a u-shape split: blocks[t:] (often none) + final norm + head + loss."""


def split_model(model: nn.Module, s: int, mode: str = "two-part", tail: int | None = None):
    """Cut ``model`` (plain or peft-wrapped) at block ``s``, 0 <= s <= L.

    ``two-part`` -> (OwnerPart, HelperPart); ``u-shape`` -> (OwnerPart, MiddlePart, UShapeHead)
    with the helper running blocks[s:tail] (tail defaults to L) and the owner keeping the rest,
    the final norm, the head and the labels.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {SPLIT_MODES}")
    n = len(family_of(model).blocks(model))
    if not is_int(s) or not 0 <= s <= n:
        raise ValueError(f"s: split point {s!r} is outside 0..{n}")
    if mode == "two-part":
        if tail is not None:
            raise ValueError(f"tail: {tail!r} is only meaningful for mode 'u-shape'")
        return OwnerPart(model, s), HelperPart(model, s)
    tail = n if tail is None else tail
    if not is_int(tail) or not s <= tail <= n:
        raise ValueError(f"tail: {tail!r} is outside {s}..{n}")
    return OwnerPart(model, s), MiddlePart(model, s, tail), UShapeHead(model, tail)


def unsplit_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The whole model in one piece: Hugging Face's own backbone forward, then our head and loss.

    Positions come from the mask as on the split path; the head pooling and the loss are the
    same functions the helper uses, so this is the reference a split must equal.
    """
    hf = unwrap(model)
    family, task = family_of(hf), task_of(hf)
    _check_ids(input_ids, int(hf.config.vocab_size), _max_length(hf))
    device = next(hf.parameters()).device
    input_ids = input_ids.to(device)
    mask = _check_mask(attention_mask, input_ids.shape[0], input_ids.shape[1], device)
    probe = torch.empty(*input_ids.shape, 0, dtype=next(hf.parameters()).dtype, device=device)
    ctx = family.context(hf, probe, mask)
    kwargs = {} if task == SEQ_CLS and family.name == "bert" else {"position_ids": ctx.position_ids}
    out = family.backbone(hf)(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs)
    logits = family.head(hf, task, out.last_hidden_state, ctx)
    if labels is None:
        return None, logits
    if loss_mask is not None:
        loss_mask = _check_mask(loss_mask, input_ids.shape[0], input_ids.shape[1], device)
    return task_loss(task, logits, labels.to(device), loss_mask, mask), logits
