"""Memory model of a split training step, in bytes, per model family.

After the Privacy-Aware SFL paper's accounting (DESIGN section 7): a device that runs
the owner part at split l holds

    frozen weights      embeddings + l blocks                        (weight dtype)
    LoRA state          r·(d_in + d_out) per adapted weight, times 4:
                        parameter, gradient and AdamW's two moments  (LoRA dtype)
    activations         l·(c_h·B·S·H + c_m·B·S·I + c_s·B·N·S²) + c_0·B·S·H elements
                        (activation dtype), for batch B, sequence S, hidden H, MLP
                        width I, heads N

The paper's fp32 figure l·(68·B·S·H + 10·B·N·S²) bytes is the case c_h = 17, c_m = 0,
c_s = 2.5 with 4-byte elements. With frozen base weights and LoRA, autograd keeps far
fewer tensors than in full fine-tuning (a frozen linear layer saves nothing for its
weight gradient), and what it keeps depends on the family (MLP width and gating,
attention kind and implementation, dropout), so the constants are fitted per family and
dropout setting by `calibrate` against real measured peaks (`measure_step`,
`benchmarks/memory_model.py`). The peak also holds the step's transient gradients and
temporaries; the fitted constants absorb them. LoRA dropout is assumed 0 (with dropout
peft keeps one more copy of each adapted layer's input).

A helper at split l holds blocks[l:] + final norm + head, one adapter per owner it
serves, and the activations of every owner's batch through its layers and the head
(the head term is c_head·B·S·O elements, O the head's output width: logits, their
log-softmax and gradient for a language model). In the u-shape mode the owner keeps
the final norm and head instead (`with_head`, `ServedOwner.head`).

Everything here is pure arithmetic on a `ModelShape` except `measure_step`, which runs
one real training step and reads what it allocated.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from atlas_p2p.layouts import LAYOUTS, MODEL_TYPES
from atlas_p2p.validation import is_int
from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS, TASKS

log = logging.getLogger(__name__)

FAMILIES = tuple(LAYOUTS)  # "gpt2", "llama", "bert"
_DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
}
ADAM_COPIES = 4  # parameter + gradient + AdamW first and second moments


def dtype_bytes(dtype: str | object) -> int:
    """Bytes of one element of `dtype` ("float32", "bfloat16", a torch.dtype, ...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: unknown, expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about an architecture (no weights)."""

    family: str  # "gpt2" | "llama" | "bert" (block layout)
    model_type: str  # HF model_type ("llama", "qwen2", ...)
    task: str  # "causal_lm" | "seq_cls"
    num_layers: int  # L, blocks in the model's block list
    hidden: int  # H
    heads: int  # N, attention heads
    kv_heads: int  # key/value heads (N unless grouped-query attention)
    head_dim: int  # per-head width (H / N for most models)
    intermediate: int  # I, MLP width
    vocab_size: int  # V
    max_positions: int  # learned position table rows (0 with rotary positions)
    type_vocab: int = 0  # BERT token-type rows
    num_labels: int = 0  # classifier outputs (seq_cls only)
    tied_head: bool = True  # LM head shares the input embedding matrix
    qkv_bias: bool = False  # LLaMA-family: bias on q/k/v (Qwen2)
    o_bias: bool = False  # LLaMA-family: bias on o_proj (attention_bias)
    mlp_bias: bool = False  # LLaMA-family: bias on MLP projections
    qk_norm: bool = False  # LLaMA-family: per-head RMSNorm on q and k (Qwen3)
    dropout: bool = False  # training-time dropout is on (it keeps masks, changes attention kernels)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: expected one of {FAMILIES}")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {TASKS}")
        for name in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("max_positions", "type_vocab", "num_labels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads}: must divide heads={self.heads}")
        if self.task == SEQ_CLS and self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels}: seq_cls needs >= 1")

    @property
    def head_out(self) -> int:
        """O, the width of the head's output per position."""
        return self.vocab_size if self.task == CAUSAL_LM else self.num_labels


def shape_from_config(config, task: str = CAUSAL_LM, num_labels: int | None = None) -> ModelShape:
    """Read a `ModelShape` from a Hugging Face config object (no weights needed)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: unsupported, expected one of {sorted(MODEL_TYPES)}")
    family = MODEL_TYPES[model_type]
    labels = num_labels if num_labels is not None else (getattr(config, "num_labels", 0) if task == SEQ_CLS else 0)
    if family == "gpt2":
        hidden = config.n_embd
        return ModelShape(
            family,
            model_type,
            task,
            config.n_layer,
            hidden,
            config.n_head,
            config.n_head,
            hidden // config.n_head,
            config.n_inner or 4 * hidden,
            config.vocab_size,
            config.n_positions,
            num_labels=labels,
            tied_head=bool(getattr(config, "tie_word_embeddings", True)),
            dropout=_any_dropout(config, "resid_pdrop", "embd_pdrop", "attn_pdrop"),
        )
    if family == "llama":
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return ModelShape(
            family,
            model_type,
            task,
            config.num_hidden_layers,
            config.hidden_size,
            heads,
            kv,
            head_dim,
            config.intermediate_size,
            config.vocab_size,
            0,
            num_labels=labels,
            tied_head=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            dropout=_any_dropout(config, "attention_dropout"),
        )
    return ModelShape(
        family,
        model_type,
        task,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_attention_heads,
        config.hidden_size // config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size,
        config.max_position_embeddings,
        type_vocab=getattr(config, "type_vocab_size", 0),
        num_labels=labels,
        dropout=_any_dropout(config, "hidden_dropout_prob", "attention_probs_dropout_prob"),
    )


def _any_dropout(config, *names: str) -> bool:
    return any(float(getattr(config, n, 0.0) or 0.0) > 0 for n in names)


# ---------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class LoraModule:
    """One weight a LoRA adapter may sit on: its full module name in the HF model."""

    name: str  # e.g. "transformer.h.3.attn.c_attn"
    block: int  # index in the block list
    kind: str  # short kind, e.g. "c_attn", "q_proj", "query"
    d_in: int
    d_out: int

    @property
    def rank1_cost(self) -> int:
        """c_i: parameters of a rank-1 adapter on this weight, d_in + d_out."""
        return self.d_in + self.d_out


def _block_weights(shape: ModelShape) -> list[tuple[str, int, int]]:
    """(kind, d_in, d_out) of the adaptable weights of one block, in the order of the family
    layout's attention then MLP linears (atlas_p2p.layouts)."""
    H, I = shape.hidden, shape.intermediate
    if shape.family == "gpt2":
        return [("c_attn", H, 3 * H), ("c_proj", H, H), ("c_fc", H, I), ("mlp_c_proj", I, H)]
    if shape.family == "llama":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        return [
            ("q_proj", H, q),
            ("k_proj", H, kv),
            ("v_proj", H, kv),
            ("o_proj", q, H),
            ("gate_proj", H, I),
            ("up_proj", H, I),
            ("down_proj", I, H),
        ]
    return [
        ("query", H, H),
        ("key", H, H),
        ("value", H, H),
        ("attn_out", H, H),
        ("intermediate", H, I),
        ("output", I, H),
    ]


@functools.lru_cache(maxsize=64)
def lora_candidates(shape: ModelShape) -> tuple[LoraModule, ...]:
    """Every weight a LoRA adapter may target, block by block, in model order."""
    layout, weights = LAYOUTS[shape.family], _block_weights(shape)
    return tuple(
        LoraModule(name, i, kind, d_in, d_out)
        for i in range(shape.num_layers)
        for name, (kind, d_in, d_out) in zip(layout.lora_module_names(i), weights, strict=True)
    )


@functools.lru_cache(maxsize=64)
def _candidate_index(shape: ModelShape) -> dict[str, LoraModule]:
    return {m.name: m for m in lora_candidates(shape)}


def candidate(shape: ModelShape, name: str) -> LoraModule:
    """The candidate module called `name`; ValueError naming it if there is none."""
    index = _candidate_index(shape)
    if name not in index:
        raise ValueError(f"module {name!r}: not an adaptable weight of this {shape.family} model")
    return index[name]


def embedding_params(shape: ModelShape) -> int:
    """Parameters of the owner-side input layer (token, position, type tables, norm)."""
    H = shape.hidden
    if shape.family == "gpt2":
        return (shape.vocab_size + shape.max_positions) * H
    if shape.family == "llama":
        return shape.vocab_size * H
    return (shape.vocab_size + shape.max_positions + shape.type_vocab) * H + 2 * H


def block_params(shape: ModelShape) -> int:
    """Parameters of one block (weights, biases, norms)."""
    H, I = shape.hidden, shape.intermediate
    if shape.family == "gpt2":
        return 4 * H + (H * 3 * H + 3 * H) + (H * H + H) + (H * I + I) + (I * H + H)
    if shape.family == "llama":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        attn = H * q + 2 * H * kv + q * H
        attn += (q + 2 * kv) * shape.qkv_bias + H * shape.o_bias + 2 * shape.head_dim * shape.qk_norm
        mlp = 3 * H * I + (2 * I + H) * shape.mlp_bias
        return 2 * H + attn + mlp
    return 4 * (H * H + H) + 4 * H + (H * I + I) + (I * H + H)


def head_params(shape: ModelShape, *, with_embedding_copy: bool) -> int:
    """Parameters after the last block: final norm, pooler and the output head.

    A tied LM head reuses the input embedding matrix; `with_embedding_copy` says whether
    that matrix must be counted here (a helper does not hold the owner's embeddings).
    """
    H, O = shape.hidden, shape.head_out
    if shape.family == "bert":
        return (H * H + H) + (H * O + O) if shape.task == SEQ_CLS else H * O
    norm = 2 * H if shape.family == "gpt2" else H
    if shape.task == SEQ_CLS:
        return norm + H * O
    tied_free = shape.tied_head and not with_embedding_copy
    return norm + (0 if tied_free else shape.vocab_size * H)


def total_params(shape: ModelShape) -> int:
    """Parameters of the whole model (tied matrices once), as `model.parameters()` counts."""
    return (
        embedding_params(shape) + shape.num_layers * block_params(shape) + head_params(shape, with_embedding_copy=False)
    )


# ---------------------------------------------------------------- the memory model


@dataclass(frozen=True)
class Workload:
    """One training step's size and the element widths used for each kind of tensor."""

    batch: int  # B, sequences per step
    seq_len: int  # S, tokens per sequence
    weight_bytes: int = 4  # frozen base weights (4 = fp32, 2 = bf16/fp16)
    act_bytes: int = 4  # activations kept for backward
    lora_bytes: int = 4  # LoRA parameters, gradients and AdamW moments

    def __post_init__(self):
        for name in ("batch", "seq_len", "weight_bytes", "act_bytes", "lora_bytes"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive int")


@dataclass(frozen=True)
class ActivationConstants:
    """Elements kept for backward, in units of the features below (fitted per family).

    elements = l·(per_hidden·B·S·H + per_mlp·B·S·I + per_score·B·N·S²)
               + fixed·B·S·H + head·B·S·O
    """

    per_hidden: float  # c_h, per block per B·S·H
    per_mlp: float  # c_m, per block per B·S·I
    per_score: float  # c_s, per block per B·N·S² (attention scores and masks)
    fixed: float = 0.0  # c_0, outside the blocks per B·S·H (embeddings, boundary gradient)
    head: float = 0.0  # c_head, per B·S·O (logits, log-softmax, their gradient)

    def __post_init__(self):
        for name in ("per_hidden", "per_mlp", "per_score", "fixed", "head"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r}: must be finite and >= 0")

    def as_array(self) -> np.ndarray:
        return np.array([self.per_hidden, self.per_mlp, self.per_score, self.fixed, self.head])


# The paper's generic fp32 accounting (68·BSH + 10·BNS² bytes per layer), used for a
# family nobody has calibrated yet.
PAPER_CONSTANTS = ActivationConstants(per_hidden=17.0, per_mlp=0.0, per_score=2.5)

# (family, dropout on) -> constants. Fitted with `python benchmarks/memory_model.py
# --calibrate` (torch 2.13 CPU, transformers 5.23 "sdpa" attention, LoRA dropout 0) on
# tiny configs with MLP ratios 2 and 4, several splits, batches and sequence lengths.
FAMILY_CONSTANTS: dict[tuple[str, bool], ActivationConstants] = {
    ("gpt2", False): ActivationConstants(per_hidden=5.632, per_mlp=5.634, per_score=0.378, fixed=6.344, head=2.635),
    ("gpt2", True): ActivationConstants(per_hidden=7.287, per_mlp=5.629, per_score=3.170, fixed=5.556, head=2.698),
    ("llama", False): ActivationConstants(per_hidden=5.596, per_mlp=4.614, per_score=0.420, fixed=6.850, head=2.678),
    ("llama", True): ActivationConstants(per_hidden=5.195, per_mlp=4.593, per_score=3.232, fixed=7.054, head=2.683),
    ("bert", False): ActivationConstants(per_hidden=5.569, per_mlp=2.624, per_score=0.404, fixed=7.597, head=0.000),
    ("bert", True): ActivationConstants(per_hidden=7.068, per_mlp=2.645, per_score=3.211, fixed=6.810, head=0.000),
}


def constants_for(shape: ModelShape) -> ActivationConstants:
    """The calibrated constants of the shape's family and dropout setting."""
    key = (shape.family, shape.dropout)
    if key not in FAMILY_CONSTANTS:
        raise ValueError(f"family={shape.family!r}, dropout={shape.dropout}: no calibrated constants")
    return FAMILY_CONSTANTS[key]


@dataclass(frozen=True)
class Footprint:
    """Bytes of one part of a training step, by kind."""

    frozen: int  # base weights
    adapter: int  # LoRA parameters + gradients + AdamW moments
    activations: int  # kept for backward, plus the step's transient gradients

    @property
    def total(self) -> int:
        return self.frozen + self.adapter + self.activations

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.frozen + other.frozen, self.adapter + other.adapter, self.activations + other.activations)


def activation_features(
    shape: ModelShape, layers: int, workload: Workload, *, embeddings: bool, head: bool
) -> np.ndarray:
    """The five feature counts that `ActivationConstants` multiplies, shape (5,)."""
    B, S = workload.batch, workload.seq_len
    H, I, N = shape.hidden, shape.intermediate, shape.heads
    return np.array(
        [
            layers * B * S * H,
            layers * B * S * I,
            layers * B * N * S * S,
            B * S * H if embeddings else 0,
            B * S * shape.head_out if head else 0,
        ],
        dtype=np.float64,
    )


def _activation_bytes(shape, layers, workload, constants, *, embeddings, head) -> int:
    feats = activation_features(shape, layers, workload, embeddings=embeddings, head=head)
    return int(math.ceil(float(feats @ constants.as_array()) * workload.act_bytes))


def _check_split(shape: ModelShape, split: int) -> None:
    if not is_int(split) or not 0 <= split <= shape.num_layers:
        raise ValueError(f"split={split!r}: must be an int in [0, {shape.num_layers}]")


def adapter_bytes(shape: ModelShape, ranks: Mapping[str, int], workload: Workload, blocks: range | None = None) -> int:
    """LoRA parameters, gradients and AdamW moments: 4·Σ r_i·(d_in + d_out)·lora_bytes.

    Only modules whose block is in `blocks` count (all blocks when None).
    """
    total = 0
    for name, rank in ranks.items():
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"ranks[{name!r}]={rank!r}: must be an int >= 0")
        module = candidate(shape, name)
        if blocks is None or module.block in blocks:
            total += rank * module.rank1_cost
    return ADAM_COPIES * workload.lora_bytes * total


def owner_footprint(
    shape: ModelShape,
    split: int,
    ranks: Mapping[str, int],
    workload: Workload,
    constants: ActivationConstants | None = None,
    *,
    with_head: bool = False,
) -> Footprint:
    """Owner at split l: embeddings + blocks[:l], its adapters, its activations.

    `with_head`: u-shape mode, the owner also keeps the final norm and the head (a tied
    LM head reuses its embedding matrix) and the head's activations.
    """
    _check_split(shape, split)
    constants = constants or constants_for(shape)
    params = embedding_params(shape) + split * block_params(shape)
    if with_head:
        params += head_params(shape, with_embedding_copy=False)
    return Footprint(
        params * workload.weight_bytes,
        adapter_bytes(shape, ranks, workload, range(split)),
        _activation_bytes(shape, split, workload, constants, embeddings=True, head=with_head),
    )


def whole_model_footprint(
    shape: ModelShape, ranks: Mapping[str, int], workload: Workload, constants: ActivationConstants | None = None
) -> Footprint:
    """A device that trains the whole model alone (no split): every block and the head."""
    constants = constants or constants_for(shape)
    frozen = total_params(shape) * workload.weight_bytes
    return Footprint(
        frozen,
        adapter_bytes(shape, ranks, workload),
        _activation_bytes(shape, shape.num_layers, workload, constants, embeddings=True, head=True),
    )


@dataclass(frozen=True)
class ServedOwner:
    """One owner a helper serves: its split, its helper-side ranks and its batch."""

    split: int
    workload: Workload
    ranks: Mapping[str, int] = field(default_factory=dict)  # modules in blocks[split:]
    head: bool = True  # the helper runs the head (False: u-shape, the owner keeps it)


def helper_weights_bytes(shape: ModelShape, split: int, weight_bytes: int, head: bool = True) -> int:
    """Frozen weights of the helper part at split l: blocks[l:] (+ final norm and head)."""
    _check_split(shape, split)
    params = (shape.num_layers - split) * block_params(shape)
    if head:
        params += head_params(shape, with_embedding_copy=True)
    return params * weight_bytes


def served_owner_footprint(
    shape: ModelShape, owner: ServedOwner, constants: ActivationConstants | None = None
) -> Footprint:
    """What one served owner adds to a helper: its adapter and its batch's activations.
    (Cached on the owner's values: a plan of a thousand nodes asks it millions of times.)"""
    _check_split(shape, owner.split)
    ranks = tuple(sorted(owner.ranks.items()))
    return _served_owner_footprint(shape, owner.split, owner.workload, ranks, owner.head, constants)


@functools.lru_cache(maxsize=4096)
def _served_owner_footprint(
    shape: ModelShape,
    split: int,
    workload: Workload,
    ranks: tuple[tuple[str, int], ...],
    head: bool,
    constants: ActivationConstants | None,
) -> Footprint:
    constants = constants or constants_for(shape)
    layers = range(split, shape.num_layers)
    return Footprint(
        0,
        adapter_bytes(shape, dict(ranks), workload, layers),
        _activation_bytes(shape, len(layers), workload, constants, embeddings=False, head=head),
    )


def helper_footprint(
    shape: ModelShape,
    owners: Sequence[ServedOwner],
    *,
    weight_bytes: int = 4,
    holds_weights: bool = False,
    constants: ActivationConstants | None = None,
) -> Footprint:
    """A helper serving `owners`: the layers the deepest-reaching owner needs, once,
    plus one adapter and one batch of activations per owner (all kept at once, the
    worst case of concurrent steps). `holds_weights`: the helper already holds the
    whole model (it trains its own data without a split), so no weights are added.
    """
    total = Footprint(0, 0, 0)
    if owners and not holds_weights:
        first = min(o.split for o in owners)
        total += Footprint(helper_weights_bytes(shape, first, weight_bytes, any(o.head for o in owners)), 0, 0)
    for owner in owners:
        total += served_owner_footprint(shape, owner, constants)
    return total


# ---------------------------------------------------------------- measurement and fit


@dataclass(frozen=True)
class StepMeasurement:
    """Bytes seen in one real training step of a model part on the CPU.

    static      parameters (distinct storages, frozen and trainable) and the AdamW
                state, counted from the real tensors before the step
    saved       distinct storages autograd saved for backward during the forward pass
                (torch.autograd.graph.saved_tensors_hooks), parameters excluded
    peak        static + the highest running sum of the CPU allocator's allocations
                minus frees during the step (zero_grad, forward, backward, AdamW
                step), read from the torch profiler's memory events: activations,
                the received output gradient, LoRA gradients and every temporary
    """

    static: int
    saved: int
    peak: int


def _storage_key(t) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _distinct_bytes(tensors: Iterable) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        ptr, nbytes = _storage_key(t)
        seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


def _profiled_peak(step: Callable[[], None]) -> int:
    """Highest running total of CPU allocations minus frees while `step` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as exc:  # the profiler's result layout changed
        raise RuntimeError("torch profiler exposes no memory events in this torch version") from exc
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    running, peak = 0, 0
    for _, nbytes in changes:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_step(module, run: Callable[[], object], *, lr: float = 1e-3, seed: int = 0) -> StepMeasurement:
    """Run one AdamW training step of `module`'s trainable parameters and measure it.

    `run()` does the forward pass and returns either a scalar loss or an output tensor
    (an owner part's activations): then a seeded random gradient of its shape stands in
    for the one a helper sends back. A warm-up step first allocates the AdamW moments,
    so the measured step is a steady-state one. The trainable parameters are restored
    afterwards and their gradients cleared, so measuring leaves the module as it was.
    """
    import torch

    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("module has no trainable parameters: attach LoRA before measuring")
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    saved_storages: dict[int, int] = {}
    param_ptrs = {_storage_key(p)[0] for p in module.parameters()}

    def pack(t):
        ptr, nbytes = _storage_key(t)
        if ptr not in param_ptrs:
            saved_storages[ptr] = max(saved_storages.get(ptr, 0), nbytes)
        return t

    def step(record: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        if record:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = run()
        else:
            out = run()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(torch.randn(out.shape, generator=generator, dtype=out.dtype))
        del out
        optimizer.step()

    try:
        step(record=False)
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        static = _distinct_bytes(list(module.parameters()) + state)
        peak = _profiled_peak(lambda: step(record=True))
    finally:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, saved in zip(trainable, before):
                p.copy_(saved)
    return StepMeasurement(static=static, saved=sum(saved_storages.values()), peak=static + peak)


@dataclass(frozen=True)
class MemorySample:
    """A measured peak and what was measured: owner part at `split`, or the whole
    model with its head (`head=True`, split = L)."""

    shape: ModelShape
    split: int
    ranks: Mapping[str, int]
    workload: Workload
    peak: int  # measured bytes
    head: bool = False

    def __post_init__(self):
        _check_split(self.shape, self.split)
        if self.head and self.split != self.shape.num_layers:
            raise ValueError(f"split={self.split}: a whole-model sample needs split = L = {self.shape.num_layers}")
        if self.peak <= 0:
            raise ValueError(f"peak={self.peak!r}: must be > 0")


def predict(sample: MemorySample, constants: ActivationConstants | None = None) -> int:
    """The memory model's bytes for what `sample` measured."""
    if sample.head:
        return whole_model_footprint(sample.shape, sample.ranks, sample.workload, constants).total
    return owner_footprint(sample.shape, sample.split, sample.ranks, sample.workload, constants).total


def calibrate(family: str, measurements: Sequence[MemorySample]) -> ActivationConstants:
    """Fit a family's activation constants to measured peaks by least squares.

    Weights and adapter state are known exactly, so the target of each sample is its
    measured peak minus them, in elements; the five constants are the non-negative
    least-squares solution of features·c ≈ target, each row divided by its measured
    peak so that the fit minimises relative (not absolute) error. Constants with no
    support in the data (e.g. the head term without whole-model samples) come out 0.
    """
    from scipy.optimize import nnls

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    if not measurements:
        raise ValueError("measurements: need at least one sample")
    if len({m.shape.dropout for m in measurements}) > 1:
        raise ValueError("measurements: mix dropout on and off; calibrate each setting apart")
    rows, targets = [], []
    for m in measurements:
        if m.shape.family != family:
            raise ValueError(f"sample of family {m.shape.family!r} given to calibrate({family!r})")
        zero = ActivationConstants(0.0, 0.0, 0.0)
        known = predict(m, zero)  # weights + adapter state only
        feats = activation_features(m.shape, m.split, m.workload, embeddings=True, head=m.head)
        rows.append(feats * m.workload.act_bytes / m.peak)
        targets.append((m.peak - known) / m.peak)
    coef, _ = nnls(np.array(rows), np.array(targets))
    constants = ActivationConstants(*(float(c) for c in coef))
    log.info("calibrated %s from %d samples: %s", family, len(measurements), constants)
    return constants


def relative_errors(samples: Sequence[MemorySample], constants: ActivationConstants | None = None) -> list[float]:
    """|predicted - measured| / measured for each sample."""
    return [abs(predict(s, constants) - s.peak) / s.peak for s in samples]
