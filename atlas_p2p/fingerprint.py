"""Task fingerprints: a seeded gradient sketch of a node's local data (DESIGN 6).

Every node runs the same recipe with the seed handed out by the bootstrap:

1. Probe: the parameters the gradient is taken in, one kind for the whole swarm
   (``FingerprintConfig.probe``, the bootstrap's ``--fingerprint-probe``):
   - head: the classification head the swarm trains (its weights as drawn from the
     swarm's init seed, identical on every node), and the class-balanced loss
     (1/C) Σ_c mean_{i in c} L_i over the C classes present. Its gradient is, per class,
     the mean final representation of that class's examples against the predicted mix:
     what the inputs of each label look like, which is what tells tasks apart. Balancing
     matters: with the plain mean loss each class enters with its frequency, and at 50
     examples a node's label counts vary so much that they drown the rest. Measured on
     real text (all-MiniLM-L6-v2, four 4-way tasks x 8 nodes of 50 examples, 8 seeds):
     cosine within a task 0.44 (plain mean: 0.22), between tasks about 0, and the
     bootstrap's K = 4 in 8 of 8 seeds, where the LoRA probe below gave K = 1 in 4 of 4.
     Only the head is differentiated, so the backward pass stops at the head.
   - lora: a rank-r (r = 4) peft LoRA on the attention projections of block 0, with A
     and B drawn from the seed (B small but non-zero, so the gradient reaches A as well),
     and the plain mean loss. The default (it needs nothing of the model but block 0's
     attention). It also sees a task's label mix, which the head probe balances away: on
     the synthetic tasks with tiny random models, which differ mostly in label mix, it
     separates tasks (cosine within a task at least 0.77, across at most 0.02) where the head probe does
     not (within 0.03 to 0.28 at worst, across up to 0.35). On real text
     at 400 examples per node the cosine within a task is 0.36 at m = 64, 0.46 at
     m = 128 and 0.63 at m = 256 (between tasks about 0.03).
   - head on a causal LM: the gradient of the mean next-token loss with respect to a zero
     output head W0 (V x d) laid on the model's final features h_t (what its LM head reads):
     G = (1/N) Σ_t (u - e_{y_t}) h_tᵀ over the N counted tokens, u the uniform distribution
     the zero head predicts. It says which tokens follow which contexts in the node's data,
     without the model's own predictions, which every task shares. G has V x d entries
     (28M on SmolLM2), so it is sketched first, S = R1 G R2ᵀ with R1 (k, V) and R2 (k, d)
     Gaussian from the seed (k = LM_SKETCH = 64), and g = vec(S) goes on to step 3;
     S is summed token by token and G never exists. Only forward passes run (no backward).
     Measured on setting c's population (SmolLM2-135M, four tasks x 2 nodes of 100 texts,
     m = 64, benchmarks/results/fingerprint-sweep-smollm2-c-*.json): the LoRA probe gives
     cosine within a task 0.42 and between 0.26 and K = 4 in 0 of 2 seeds; this one 0.88
     and 0.55, K = 4 in 3 of 4. With the model's own head (its predictions in the gradient)
     the tasks drew closer (a prototype on the 64 x 64 sketches: K = 2 in 2 of 2 seeds, against
     K = 4 in 2 of 2 with the data term -e_y hᵀ alone).
   A node whose budget is below the whole model computes either across a cut
   (atlas_p2p.training.fingerprinting): block 0 is always on it, and a two-part helper
   sends back the head's gradient with ∂L/∂h.
2. Gradient. g = d/dθ_probe of the loss over the node's m samples (m = 256 by default),
   flattened in sorted parameter-name order. The m samples go through the model in
   micro-batches (one class each under the head probe), so memory stays at one
   micro-batch's activations.
3. Optional differential privacy (Gaussian mechanism): g ← g · min(1, C/‖g‖), then
   g ← g + N(0, σ²C² I). The noise comes from a private generator, never from the
   public seed (noise anyone can regenerate protects nothing).
4. Sketch. f = P g / ‖P g‖ with P a (64, dim(g)) standard Gaussian matrix from the seed.
   By Johnson-Lindenstrauss, cos(f_i, f_j) ≈ cos(g_i, g_j), so nodes whose data pull the
   model the same way get nearby fingerprints. P is generated in column chunks so a big
   model never needs the whole matrix in memory; the result does not depend on how the
   gradient is chunked.

The loss is a parameter, ``loss_fn(model, batch) -> scalar tensor``, so the runtime can
compute it across an owner and a provisional helper. The model comes back with the same
modules, parameters, requires_grad flags, gradients and train/eval modes it had.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlas_p2p.vocabulary import FINGERPRINT_PROBES, PROBE_HEAD, PROBE_LORA

logger = logging.getLogger(__name__)

PROBE_ADAPTER = "atlas_probe"
PROJECTION_CHUNK = 4096  # columns of P generated at a time; part of P's definition
LM_SKETCH = 64  # k: a causal LM's head gradient is sketched to k x k numbers (module doc)
_BLOCK_LIST_NAMES = ("h", "layers", "layer", "blocks")

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class FingerprintConfig:
    """How every node fingerprints (the bootstrap hands out ``seed``)."""

    seed: int  # fixes the probe's A, B and the projection P
    dim: int = 64  # length of the fingerprint
    rank: int = 4  # rank of the probe LoRA
    num_samples: int = 256  # m: examples averaged over (64 and 128 leave real-text tasks unseparated)
    b_std: float = 0.01  # std of the probe's B (non-zero so gradients reach A)
    clip: float | None = None  # C: clip ||g|| to this before adding noise
    sigma: float = 0.0  # noise multiplier: noise std is sigma * clip
    target_modules: tuple[str, ...] | None = None  # override of the LoRA probe's module names
    probe: str = PROBE_LORA  # lora | head (module doc): what the gradient is taken in

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FingerprintConfig.seed must be an int >= 0, got {self.seed!r}")
        for name in ("dim", "rank", "num_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FingerprintConfig.{name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.b_std) and self.b_std > 0):
            raise ValueError(f"FingerprintConfig.b_std must be a finite number > 0, got {self.b_std!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"FingerprintConfig.clip must be None or a finite number > 0, got {self.clip!r}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"FingerprintConfig.sigma must be a finite number >= 0, got {self.sigma!r}")
        if self.sigma > 0 and self.clip is None:
            raise ValueError(f"FingerprintConfig.sigma={self.sigma} needs clip (noise std is sigma * clip)")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("FingerprintConfig.target_modules must be None or a non-empty tuple")
        if self.probe not in FINGERPRINT_PROBES:
            raise ValueError(f"FingerprintConfig.probe must be one of {FINGERPRINT_PROBES}, got {self.probe!r}")


# -- the probe -----------------------------------------------------------------------
def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def probe_targets(model: nn.Module) -> list[str]:
    """Sorted names of block 0's attention projections (q/k/v/o, or GPT-2's c_attn/c_proj).

    A Hugging Face model of a known family asks ``lora.lora_targets`` (the family's own
    list); anything else, e.g. a split ``OwnerPart``, is searched: the first
    ``nn.ModuleList`` named h / layers / layer / blocks, and in its block 0 the Linear or
    Conv1D modules whose name mentions attn/attention.
    """
    try:
        from atlas_p2p.lora import lora_targets

        return sorted(lora_targets(model, layers=[0], kinds=("attn",)))
    except (ImportError, ValueError, AttributeError):
        pass
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES and len(module):
            prefix = f"{name}.0."
            found = [
                prefix + sub
                for sub, leaf in module[0].named_modules()
                if sub and _is_projection(leaf) and ("attn" in sub or "attention" in sub)
            ]
            if found:
                return sorted(found)
    raise ValueError(
        "cannot find block 0's attention projections (no ModuleList named h/layers/layer/blocks "
        "with Linear/Conv1D modules under an attention submodule); pass target_modules"
    )


def _probe_init(model: nn.Module, targets: Sequence[str], config: FingerprintConfig) -> None:
    """Overwrite the probe's A ~ N(0, 1/d_in) and B ~ N(0, b_std²), in target order."""
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name in targets:
            layer = model.get_submodule(name)
            a = layer.lora_A[PROBE_ADAPTER].weight  # (r, d_in)
            b = layer.lora_B[PROBE_ADAPTER].weight  # (d_out, r)
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=gen) * config.b_std)


def _check_targets(model: nn.Module, targets: Sequence[str]) -> list[nn.Module]:
    """The target modules, after checking they exist, are projections and carry no LoRA."""
    from peft.tuners.lora import LoraLayer

    modules = []
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"probe target {name!r} is not a module of {type(model).__name__}") from None
        if isinstance(module, LoraLayer):
            raise ValueError(f"probe target {name!r} already carries a LoRA adapter; fingerprint the base model")
        if not _is_projection(module):
            raise ValueError(f"probe target {name!r} is a {type(module).__name__}, not a Linear/Conv1D")
        modules.append(module)
    return modules


def _attach_probe(model: nn.Module, targets: Sequence[str], modules: Sequence[nn.Module], config) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.rank,  # scaling 1
        lora_dropout=0.0,
        target_modules=list(targets),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in modules),
    )
    inject_adapter_in_model(lora, model, adapter_name=PROBE_ADAPTER)
    _probe_init(model, targets, config)


def _detach_probe(model: nn.Module, targets: Sequence[str], had_config: bool, old_config) -> None:
    from peft.tuners.lora import LoraLayer

    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = getattr(parent, child)
        if isinstance(wrapped, LoraLayer):  # checked free of LoRA before the probe went on
            setattr(parent, child, wrapped.get_base_layer())
    if had_config:
        model.peft_config = old_config
    elif hasattr(model, "peft_config"):
        del model.peft_config


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    if "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: no tensor in the batch")


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of a sequence classifier's trained head (the family's ``trainable_head``)."""
    from atlas_p2p.models.families import SEQ_CLS, family_of

    names = family_of(model).trainable_head.get(SEQ_CLS, ())
    params = {f"{m}.{n}": p for m in names for n, p in model.get_submodule(m).named_parameters()}
    if not params:
        raise ValueError(f"{type(model).__name__} has no classification head to probe")
    return params


def _class_weights(batches: Sequence[Mapping[str, torch.Tensor]], sizes: Sequence[int]) -> list[float]:
    """Weight of each one-class micro-batch in the class-balanced loss (1/C) Σ_c mean_{i in c} L_i."""
    classes = []
    for batch in batches:
        y = batch.get("labels")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or not bool((y == y[0]).all()):
            raise ValueError("a head probe needs micro-batches of one class each (fingerprint_sample makes them)")
        classes.append(int(y[0]))
    per_class: dict[int, int] = {}
    for c, n in zip(classes, sizes):
        per_class[c] = per_class.get(c, 0) + n
    return [n / (per_class[c] * len(per_class)) for c, n in zip(classes, sizes)]


def probe_gradient(
    model: nn.Module,
    batches: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
) -> np.ndarray:
    """(dim(g),) float64: gradient of the node's loss w.r.t. the probe (module doc).

    ``batches`` is one batch or several micro-batches with sizes n_b and mean losses L_b.
    LoRA probe: the gradient of Σ_b (n_b / Σn) L_b, the mean over every sample. Head probe:
    every micro-batch holds one class, and the loss is the class-balanced
    (1/C) Σ_c mean_{i in c} L_i. The model is left as it came (see module doc).
    """
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise ValueError("probe_gradient needs at least one batch")
    sizes = [_batch_size(b) for b in batches]
    total = sum(sizes)
    if total == 0:
        raise ValueError("probe_gradient got only empty batches")
    from peft import PeftModel

    from atlas_p2p.models import CAUSAL_LM, task_of

    if isinstance(model, PeftModel):
        raise ValueError("model is peft-wrapped; fingerprint the base model (before attach_lora)")
    kind = config.probe
    if kind == PROBE_HEAD and task_of(model) == CAUSAL_LM:
        return lm_head_gradient(model, batches, loss_fn, config)
    if kind == PROBE_HEAD:
        weights = _class_weights(batches, sizes)
        targets, modules = [], []
    else:
        weights = [n / total for n in sizes]
        targets = sorted(config.target_modules) if config.target_modules else probe_targets(model)
        modules = _check_targets(model, targets)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    had_config = hasattr(model, "peft_config")
    old_config = dict(model.peft_config) if had_config else None
    old_grads = {}
    try:
        if kind == PROBE_HEAD:
            probe = head_parameters(model)
            old_grads = {n: p.grad for n, p in probe.items()}
        else:
            _attach_probe(model, targets, modules, config)
            probe = {n: p for n, p in model.named_parameters() if f".{PROBE_ADAPTER}." in n}
        chosen = {id(p) for p in probe.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        for p in probe.values():
            p.grad = None
        model.eval()  # no dropout: the same data gives the same fingerprint
        with torch.enable_grad():
            for batch, w in zip(batches, weights):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
                if not torch.isfinite(loss):
                    raise ValueError(f"loss_fn returned a non-finite loss {loss.item()}")
                (loss * w).backward()
        parts = []
        for name in sorted(probe):
            grad = probe[name].grad
            parts.append(torch.zeros(probe[name].numel()) if grad is None else grad.detach().reshape(-1))
        g = torch.cat(parts).to(torch.float64).cpu().numpy()  # (dim(g),)
    finally:
        if kind == PROBE_LORA:
            _detach_probe(model, targets, had_config, old_config)
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
            if name in old_grads:
                p.grad = old_grads[name]
        for name, m in model.named_modules():
            if name in modes:
                m.train(modes[name])
    logger.debug("%s probe gradient over %d samples: dim %d, norm %.4g", kind, total, g.size, np.linalg.norm(g))
    return g


def lm_head_gradient(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
) -> np.ndarray:
    """(LM_SKETCH²,) float64: vec(R1 G R2ᵀ), G the gradient at a zero LM head (module doc).

    ``loss_fn`` only has to run the model's output head on the final features (the whole
    model, or the owner's head after a helper's hidden states); a forward pre-hook reads
    them. Nothing is differentiated and the model is left as it came.
    """
    from atlas_p2p.models import IGNORE_INDEX

    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear LM head to probe")
    vocab, width = head.weight.shape
    k = LM_SKETCH
    r1 = torch.from_numpy(np.random.default_rng([config.seed, 0x1A]).standard_normal((vocab, k)))  # R1ᵀ (V, k)
    r2 = torch.from_numpy(np.random.default_rng([config.seed, 0x2A]).standard_normal((width, k)))  # R2ᵀ (d, k)
    r1_u = r1.mean(0)  # (k,) R1 u
    sketch = torch.zeros(k, k, dtype=torch.float64)
    tokens = 0
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        for batch in batches:
            seen.clear()
            with torch.no_grad():
                loss_fn(model, batch)
            if len(seen) != 1:
                raise ValueError(f"the LM head ran {len(seen)} times in one micro-batch, not once")
            labels = batch["labels"]
            if labels.dim() != 2 or tuple(labels.shape) != tuple(seen[0].shape[:2]):
                raise ValueError(f"labels {tuple(labels.shape)} do not match the head's input {tuple(seen[0].shape)}")
            target = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
            keep = target != IGNORE_INDEX
            h = seen[0][:, :-1][keep].to(torch.float64)  # (n, d)
            y = target[keep].long()  # (n,)
            sketch += (r1_u - r1[y]).T @ (h @ r2)  # Σ_t R1(u - e_y) (R2 h_t)ᵀ, (k, k)
            tokens += int(y.numel())
    finally:
        hook.remove()
        for name, m in model.named_modules():
            if name in modes:
                m.train(modes[name])
    if tokens == 0:
        raise ValueError("no counted token to fingerprint (every label is padding)")
    g = (sketch / tokens).reshape(-1).numpy()
    logger.debug("lm head probe over %d tokens: norm %.4g", tokens, np.linalg.norm(g))
    return g


# -- privacy and sketch --------------------------------------------------------------
def privatize(g: np.ndarray, clip: float | None, sigma: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian mechanism on g: clip ‖g‖ to ``clip`` (C), then add N(0, σ²C² I).

    ``rng`` must be private to the node (default: fresh OS entropy). With ``clip=None``
    and ``sigma=0`` this is the identity.
    """
    g = np.asarray(g, dtype=np.float64)
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if clip is None:
        if sigma > 0:
            raise ValueError(f"sigma={sigma} needs a clip norm")
        return g.copy()
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    norm = float(np.linalg.norm(g))
    out = g * min(1.0, clip / norm) if norm > 0 else g.copy()
    if sigma > 0:
        rng = rng if rng is not None else np.random.default_rng()
        out = out + rng.normal(0.0, sigma * clip, size=out.shape)
    return out


def project(g: np.ndarray, seed: int, dim: int = 64) -> np.ndarray:
    """(dim,) float32 unit vector P g / ‖P g‖; P ~ N(0, 1) of shape (dim, len(g)) from ``seed``.

    Column chunk c of P (PROJECTION_CHUNK wide) is drawn from ``default_rng([seed, 0xF1, c])``,
    so P depends only on (seed, len(g)) and never exists whole.
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if g.size == 0 or not np.all(np.isfinite(g)):
        raise ValueError("cannot project an empty or non-finite gradient")
    out = np.zeros(dim, dtype=np.float64)
    for c, start in enumerate(range(0, g.size, PROJECTION_CHUNK)):
        piece = g[start : start + PROJECTION_CHUNK]
        p = np.random.default_rng([seed, 0xF1, c]).standard_normal((dim, piece.size))  # (dim, chunk)
        out += p @ piece
    norm = float(np.linalg.norm(out))
    if norm == 0.0:
        raise ValueError("the projected gradient is zero (is the loss constant in the probe?)")
    return (out / norm).astype(np.float32)


def compute_fingerprint(
    model: nn.Module,
    batches: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
    noise_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(config.dim,) float32 unit fingerprint of the data in ``batches`` (module doc)."""
    g = probe_gradient(model, batches, loss_fn, config)
    return project(privatize(g, config.clip, config.sigma, noise_rng), config.seed, config.dim)


def fingerprint_sample(encoded, config: FingerprintConfig, micro_batch: int | None = None) -> list[dict]:
    """The node's m = ``config.num_samples`` fingerprint examples as padded batches.

    A seeded choice (from ``config.seed``) of min(m, N) examples of a
    :class:`atlas_p2p.data.Encoded`, cut into micro-batches of ``micro_batch`` (default:
    one batch) to bound memory. Under the head probe on classification data the examples
    are grouped by class first, one class per micro-batch, for the class-balanced loss. Micro-batches take the chosen examples shortest first (ties by index), so each
    pads to about its own length: on real text (lengths 5 to 64 tokens) that halves the
    tokens pushed through the model. The gradient does not depend on how a group is cut.
    """
    from atlas_p2p.data import collate

    n = len(encoded)
    if n == 0:
        raise ValueError("no examples to fingerprint")
    m = min(config.num_samples, n)
    chosen = np.sort(np.random.default_rng([config.seed, 0x5A]).choice(n, size=m, replace=False))
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch must be None or an int >= 1, got {micro_batch!r}")
    if config.probe == PROBE_HEAD and encoded.kind == "classification":
        labels = np.asarray(encoded.targets)[chosen]
        groups = [chosen[labels == c] for c in np.unique(labels)]
    else:
        groups = [chosen]
    batches = []
    for group in groups:
        step = micro_batch or len(group)
        if step < len(group):
            group = group[np.argsort(encoded.lengths[group], kind="stable")]  # shortest first
        batches += [collate(encoded, group[i : i + step]) for i in range(0, len(group), step)]
    return batches


def dp_epsilon(sigma: float, delta: float, sensitivity: float = 2.0) -> float:
    """ε of one release of the Gaussian mechanism above, for a given δ.

    Analytic Gaussian mechanism (Balle & Wang, ICML 2018, Thm 8): with noise std s and
    L2 sensitivity Δ, the release is (ε, δ)-DP iff
        Φ(Δ/(2s) − εs/Δ) − e^ε Φ(−Δ/(2s) − εs/Δ) ≤ δ.
    Here s = σC and Δ = κC, so only u = κ/σ matters; we solve for the smallest ε by
    bisection. ``sensitivity`` κ is in units of C: 2 (default) bounds any change of the
    node's data (two clipped gradients lie in a ball of radius C), 1 is the add/remove
    convention for one clipped contribution. σ = 0 gives ε = inf.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    if sigma == 0:
        return math.inf
    from scipy.special import log_ndtr, ndtr

    u = sensitivity / sigma

    def delta_of(eps: float) -> float:
        return float(ndtr(u / 2 - eps / u) - math.exp(eps + log_ndtr(-u / 2 - eps / u)))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi
