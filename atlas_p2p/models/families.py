"""Family adapters: where each Hugging Face model family keeps its parts and how to run a block.

A *family* groups architectures that share a module layout; the layout itself (module
paths, LoRA-able linears, supported tasks) is the torch-free table in atlas_p2p.layouts,
which the memory model reads too. A `Family` is one row of that table plus how its
blocks, embeddings and heads run:

- ``gpt2``: GPT-2 (learned absolute positions, fused ``c_attn``, ``Conv1D`` weights stored (in, out)).
- ``llama``: LLaMA, Mistral, Qwen2/Qwen3, SmolLM (rotary positions, RMSNorm, q/k/v/o + gated MLP).
- ``bert``: BERT encoders for sequence classification (bidirectional mask, [CLS] pooler).

Everything that a block needs besides its input hidden states (position ids, rotary cos/sin,
the 4-D attention mask of the attention backend) is rebuilt from the 2-D ``attention_mask``
by :meth:`Family.context`. The mask is the only thing that travels with the activations, so
both sides of a split compute bit-identical contexts and split == unsplit.

Position ids of decoder families come from the mask, ``p_t = max(0, Σ_{u<=t} m_u - 1)``
(as ``generate`` does), so a left-padded sequence sees the same positions as its
right-padded twin. BERT keeps its absolute positions ``0..T-1`` (it is right-padded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from atlas_p2p.layouts import BERT, GPT2, LLAMA, LORA_KINDS, FamilyLayout
from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS


@dataclasses.dataclass(frozen=True, eq=False)
class BlockContext:
    """Per-forward inputs shared by every block, rebuilt on each side of a split."""

    attention_mask: torch.Tensor  # (B, T) 1 = token, 0 = padding
    position_ids: torch.Tensor  # (B, T) long
    masks: dict[str, Any]  # attention kind -> mask for the backend ((B, 1, T, T) or None)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # rotary (cos, sin), each (B, T, d_head)
    layer_kinds: tuple[str, ...] = ()  # attention kind per block; empty = all "full_attention"

    def mask_for(self, index: int) -> Any:
        """Backend mask for block ``index``."""
        kind = self.layer_kinds[index] if self.layer_kinds else "full_attention"
        return self.masks[kind]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the Hugging Face model inside a peft wrapper (or the model itself).

    peft replaces targeted linears in place, so the returned model already runs the adapters.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row: ``max(0, cumsum(m) - 1)``. (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the right-most real token of each row (works for left and right padding).

    hidden (B, T, H), attention_mask (B, T) -> (B, H). A row without real tokens pools position 0.
    """
    t = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (t * (attention_mask != 0).long()).argmax(-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


class Family(FamilyLayout):
    """One model family: its layout (the fields of atlas_p2p.layouts.FamilyLayout, built from
    that table) and how it runs. Subclasses say how a block, the embeddings and the head are called."""

    head_attrs: dict[str, tuple[str, ...]] = {}  # task -> attributes of the task model forming the head
    trainable_head: dict[str, tuple[str, ...]] = {}  # task -> head modules trained with LoRA

    # ---- where things are -------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(unwrap(model), self.backbone_attr)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(self.backbone(model), self.blocks_attr)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        if self.final_norm_attr is None:
            return None
        return getattr(self.backbone(model), self.final_norm_attr)

    def embedding_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules the owner needs before block 0 (parameters only; behaviour is :meth:`embed`)."""
        raise NotImplementedError

    def context_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules every side needs to rebuild the block context (e.g. the rotary table)."""
        return {}

    def head_modules(self, model: nn.Module, task: str) -> dict[str, nn.Module]:
        hf = unwrap(model)
        return {a.replace(".", "_"): _get(hf, a) for a in self.head_attrs[task]}

    # ---- how things run ---------------------------------------------------------------
    def context(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> BlockContext:
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, block: nn.Module, index: int, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        raise NotImplementedError

    def head(self, model: nn.Module, task: str, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Final-normed hidden (B, T, H) -> logits: (B, T, V) for causal_lm, (B, C) for seq_cls."""
        raise NotImplementedError


class _DecoderFamily(Family):
    """Shared parts of the causal decoder families."""

    head_attrs = {CAUSAL_LM: ("lm_head",), SEQ_CLS: ("score",)}
    trainable_head = {CAUSAL_LM: (), SEQ_CLS: ("score",)}

    def head(self, model, task, hidden, ctx):
        hf = unwrap(model)
        if task == CAUSAL_LM:
            return hf.lm_head(hidden)  # (B, T, V)
        return hf.score(pool_last_token(hidden, ctx.attention_mask))  # (B, C)


class Gpt2Family(_DecoderFamily):
    def embedding_modules(self, model):
        bb = self.backbone(model)
        return {"wte": bb.wte, "wpe": bb.wpe, "drop": bb.drop}

    def context(self, model, hidden, attention_mask):
        pos = positions_from_mask(attention_mask)
        mask = create_causal_mask(
            config=self.backbone(model).config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=pos,
        )
        return BlockContext(attention_mask, pos, {"full_attention": mask}, None)

    def embed(self, model, input_ids, ctx):
        bb = self.backbone(model)
        return bb.drop(bb.wte(input_ids) + bb.wpe(ctx.position_ids))  # (B, T, H)

    def run_block(self, block, index, hidden, ctx):
        return block(hidden, attention_mask=ctx.mask_for(index), position_ids=ctx.position_ids)


class LlamaFamily(_DecoderFamily):
    """LLaMA-style decoders: rotary positions, per-layer full or sliding-window attention."""

    def embedding_modules(self, model):
        return {"embed_tokens": self.backbone(model).embed_tokens}

    def context_modules(self, model):
        return {"rotary_emb": self.backbone(model).rotary_emb}

    @staticmethod
    def _layer_kinds(config) -> list[str]:
        kinds = getattr(config, "layer_types", None)
        if kinds:
            return list(kinds)
        default = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        return [default] * config.num_hidden_layers

    def context(self, model, hidden, attention_mask):
        bb = self.backbone(model)
        pos = positions_from_mask(attention_mask)
        kw = dict(
            config=bb.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=pos,
        )
        kinds = tuple(self._layer_kinds(bb.config))
        masks: dict[str, Any] = {}
        for kind in sorted(set(kinds)):
            build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = build(**kw)
        return BlockContext(attention_mask, pos, masks, bb.rotary_emb(hidden, position_ids=pos), kinds)

    def embed(self, model, input_ids, ctx):
        return self.backbone(model).embed_tokens(input_ids)  # (B, T, H)

    def run_block(self, block, index, hidden, ctx):
        return block(
            hidden,
            attention_mask=ctx.mask_for(index),
            position_ids=ctx.position_ids,
            position_embeddings=ctx.position_embeddings,
        )


class BertFamily(Family):
    head_attrs = {SEQ_CLS: ("bert.pooler", "dropout", "classifier")}
    trainable_head = {SEQ_CLS: ("classifier",)}

    def embedding_modules(self, model):
        return {"embeddings": self.backbone(model).embeddings}

    def context(self, model, hidden, attention_mask):
        t = attention_mask.shape[1]
        pos = torch.arange(t, device=attention_mask.device).expand(attention_mask.shape[0], t)
        mask = create_bidirectional_mask(
            config=self.backbone(model).config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return BlockContext(attention_mask, pos, {"full_attention": mask}, None)

    def embed(self, model, input_ids, ctx):
        return self.backbone(model).embeddings(input_ids=input_ids)  # (B, T, H), positions 0..T-1

    def run_block(self, block, index, hidden, ctx):
        return block(hidden, attention_mask=ctx.mask_for(index))

    def head(self, model, task, hidden, ctx):
        hf = unwrap(model)
        pooled = hf.bert.pooler(hidden)  # (B, H) from the [CLS] position
        return hf.classifier(hf.dropout(pooled))  # (B, C)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (Gpt2Family(**vars(GPT2)), LlamaFamily(**vars(LLAMA)), BertFamily(**vars(BERT)))
}
_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def family_of(model: nn.Module) -> Family:
    """The family adapter of a (possibly peft-wrapped) HF model; ValueError if unsupported."""
    hf = unwrap(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} ({type(hf).__name__}); supported: {sorted(_BY_MODEL_TYPE)}"
        )
    if not hasattr(hf, family.backbone_attr):
        raise ValueError(
            f"{type(hf).__name__} has no {family.backbone_attr!r} backbone; load it with a causal_lm or seq_cls head"
        )
    return family


def task_of(model: nn.Module) -> str:
    """``causal_lm`` or ``seq_cls``, read from the head the model carries."""
    hf = unwrap(model)
    family = family_of(hf)
    for task in family.tasks:
        if all(_has(hf, a) for a in family.head_attrs[task]):
            return task
    raise ValueError(f"{type(hf).__name__}: no head for any of {family.tasks}")


def _has(root: nn.Module, path: str) -> bool:
    try:
        return _get(root, path) is not None
    except AttributeError:
        return False


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks L of the model."""
    return len(family_of(model).blocks(model))


def lora_module_names(model: nn.Module, layer: int, kinds: tuple[str, ...] = ("attn",)) -> list[str]:
    """LoRA-able linear modules of block ``layer`` grouped by ``kinds`` (``attn``, ``mlp``)."""
    bad = [k for k in kinds if k not in LORA_KINDS]
    if bad:
        raise ValueError(f"kinds: unknown {bad}; choose from {LORA_KINDS}")
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer: {layer} is outside 0..{n - 1}")
    return family_of(model).lora_module_names(layer, tuple(kinds))
