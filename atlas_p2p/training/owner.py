"""The owner's side of split training: embeddings + blocks[:s] with its LoRA (SplitLoRA's client).

One round (docs/RUNTIME.md) on the owner:

    start_round(r)         fresh adapters from round_seed(run_seed, node_id, r): A random, B = 0,
                           fresh AdamW, the trainable head copy back at its base value
    two-part, per step:    fwd = forward(batch)  -> send fwd.activations, mask, labels
                           backward(grad)        <- the helper's gradient of the activations; AdamW step
    u-shape, per step:     fwd = forward(batch)  -> send activations and mask (labels stay here)
                           loss, g = finish(h)   <- the helper's output hidden states; head + loss here
                           backward(grad)        <- after sending g, the helper's gradient of fwd.activations
    alone (s == L):        local_step(batch) -> loss
    end of round:          contribution(n, helper_factors, helper_dense) -> aggregation.Contribution
    merge:                 fold(patch)  (W += B̃ Ã on every module, head base += ΔD; next round starts)
    history left the anchor's: rebase(base, fork)  (patches after fork out, the anchor's in)

The backward across the cut is the chain rule split in two: with h the activations sent,
∂L/∂θ_owner = (∂h/∂θ_owner)ᵀ ∂L/∂h, and ∂L/∂h is what the helper returns; AdamW is
elementwise, so two optimisers over disjoint parameters step exactly like one over all of
them. Hence N split steps equal N steps of the unsplit model with the same seeds.

rollback() restarts the current round from its reproducible start (used when a helper is
lost): replaying the same batches gives the same adapter. A contribution that missed a
round's manifest is kept and mixed into the next one (:func:`carry.carry_over`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel

from atlas_p2p.aggregation import Contribution, Patch, as_factors
from atlas_p2p.lora import ADAPTER, get_factors, reset_adapters
from atlas_p2p.models import SPLIT_MODES, num_layers, split_model, task_of, unsplit_forward
from atlas_p2p.privacy.noise import ActivationNoise, add_noise, private_generator
from atlas_p2p.validation import is_int, require_int, require_number
from atlas_p2p.versioning import PatchRecord, VersionedBase

from .carry import carry_over
from .errors import SessionStateError
from .fold import apply_to_model, fold_into
from .inputs import as_tensor, check_float, check_labels
from .modules import (
    adapted_modules,
    dense_base_param,
    head_params,
    layer_of,
    lora_params,
    model_device,
    model_dtype,
    num_classes,
    reset_head,
    weight_shape,
)
from .rng import seeded
from .seeds import round_seed, step_seed

__all__ = ["OwnerConfig", "OwnerForward", "OwnerSession"]

log = logging.getLogger(__name__)


def _tensors_of(value: Any, name: str) -> Any:
    """(A, B, scaling) with private tensor copies of A and B (arrays from the wire may be read-only)."""
    if all(hasattr(value, k) for k in ("A", "B", "scaling")):
        value = (value.A, value.B, value.scaling)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return (
            as_tensor(value[0], f"helper_factors[{name!r}].A"),
            as_tensor(value[1], f"helper_factors[{name!r}].B"),
            value[2],
        )
    return value


@dataclasses.dataclass(frozen=True)
class OwnerConfig:
    """How one owner trains; the helper must be told the same lr and weight decay."""

    node_id: int | str  # this node's id: seeds its rounds and names its contributions
    split: int  # owner runs blocks[:split]; split == L trains the whole model alone
    lr: float = 1e-3  # AdamW learning rate
    run_seed: int = 0  # run-wide seed, round seeds derive from it
    mode: str = "two-part"  # "two-part" (labels travel) or "u-shape" (head and labels stay here)
    weight_decay: float = 0.0  # AdamW weight decay
    cluster: str = "0"  # cluster id of the base-version log
    activation_noise: ActivationNoise | None = None  # noise on the activations sent (privacy.noise); None: none

    def __post_init__(self) -> None:
        if not (is_int(self.node_id) or isinstance(self.node_id, str)) or self.node_id == "":
            raise ValueError(f"node_id: {self.node_id!r} must be an int or a non-empty string")
        if isinstance(self.node_id, int) and self.node_id < 0:
            raise ValueError(f"node_id: {self.node_id!r} must be >= 0")
        if not is_int(self.split) or self.split < 1:
            raise ValueError(f"split: {self.split!r} must be an int >= 1 (the owner runs at least one block)")
        require_number("lr", self.lr, positive=True)
        require_number("weight_decay", self.weight_decay, 0)
        require_int("run_seed", self.run_seed)
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {SPLIT_MODES}")
        if not isinstance(self.cluster, str) or not self.cluster:
            raise ValueError(f"cluster: {self.cluster!r} must be a non-empty string")
        if self.activation_noise is not None and not isinstance(self.activation_noise, ActivationNoise):
            raise ValueError(f"activation_noise: {self.activation_noise!r} must be None or an ActivationNoise")


@dataclasses.dataclass(frozen=True, eq=False)
class OwnerForward:
    """What the owner sends for one step (a ``forward`` message)."""

    round: int
    step: int
    activations: torch.Tensor  # (B, T, H), detached
    attention_mask: torch.Tensor  # (B, T) int64
    labels: torch.Tensor | None  # (B, T) or (B,) in two-part mode; None in u-shape mode


@dataclasses.dataclass(eq=False)
class _InFlight:
    """A forward waiting for its gradient."""

    hidden: torch.Tensor  # (B, T, H) with its graph
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor
    finished: bool = False  # u-shape: finish() ran, head grads are in place
    loss: float | None = None


class OwnerSession:
    """One owner's split-training state (see the module docstring for the call order).

    ``model`` is a peft model of the whole model (``lora.attach_lora``) whose ``default`` adapter
    has the owner's ranks on blocks[:split] (adapters on blocks[split:] may exist; they are
    neither trained nor contributed here, the helper trains those). The model is used in place.
    """

    def __init__(self, model: PeftModel, config: OwnerConfig, base: VersionedBase | None = None) -> None:
        if not isinstance(model, PeftModel):
            raise ValueError(f"model: expected a peft model (lora.attach_lora), got {type(model).__name__}")
        if not isinstance(config, OwnerConfig):
            raise ValueError(f"config: expected an OwnerConfig, got {type(config).__name__}")
        n = num_layers(model)
        if config.split > n:
            raise ValueError(f"split: {config.split} is outside 1..{n} for a model of {n} blocks")
        if base is not None and not isinstance(base, VersionedBase):
            raise ValueError(f"base: expected a VersionedBase, got {type(base).__name__}")
        self.model = model
        self.config = config
        self.task = task_of(model)
        self.num_layers = n
        self.local = config.split == n
        self.runs_head = self.local or config.mode == "u-shape"
        self.modules = tuple(m for m in adapted_modules(model, ADAPTER) if (layer_of(model, m) or 0) < config.split)
        if not self.modules:
            raise ValueError(f"model: no LoRA adapter on blocks[:{config.split}]; the owner would train nothing")
        self.head_names = tuple(head_params(model, ADAPTER))
        self.base = base if base is not None else VersionedBase(config.cluster)
        self._front = self._tail = None
        if not self.local:
            parts = split_model(model, config.split, config.mode)
            self._front = parts[0]  # embeddings + blocks[:s]
            self._tail = parts[2] if config.mode == "u-shape" else None  # final norm + head
        self.round = -1  # no round started yet
        self.step = 0  # steps completed in the current round
        self.samples = 0  # samples trained in the current round
        self.losses: list[float] = []  # losses of the current round's steps, when known
        self.pending: Contribution | None = None  # an earlier contribution that missed its manifest
        self._outgoing: Contribution | None = None  # this round's contribution, once made
        self._inflight: _InFlight | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._head_start: dict[str, torch.Tensor] = {}
        self._seed = 0
        self._noise_gen = private_generator() if config.activation_noise is not None else None

    # ---- state ----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The base version this node runs."""
        return self.base.version

    @property
    def seed(self) -> int:
        """The current round's seed: the helper draws the server-side adapter from it too."""
        return self._seed

    @property
    def closed(self) -> bool:
        """True once this round's contribution is made (no more steps until fold or rollback)."""
        return self._outgoing is not None and self._outgoing.round == self.round

    def _trainables(self) -> list[torch.nn.Parameter]:
        params = lora_params(self.model, self.modules, ADAPTER)
        if self.runs_head:
            params += list(head_params(self.model, ADAPTER).values())
        return params

    # ---- rounds ---------------------------------------------------------------------------
    def start_round(self, round: int) -> None:
        """Fresh adapters for ``round`` (A from the round seed, B = 0), head copy at its base, new AdamW.

        An earlier round's contribution that was never folded is carried into the next one.
        """
        require_int("round", round, 0)
        if self._outgoing is not None:
            if self._outgoing.round < round:
                self.pending = self._outgoing  # it already holds the older pending
            self._outgoing = None
        self._seed = round_seed(self.config.run_seed, self.config.node_id, round)
        reset_adapters(self.model, self._seed)
        self._head_start = reset_head(self.model, ADAPTER)
        self._optimizer = torch.optim.AdamW(
            self._trainables(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        self.round, self.step, self.samples, self.losses = round, 0, 0, []
        self._inflight = None
        log.debug("owner %s: round %d starts (seed %d)", self.config.node_id, round, self._seed)

    def rollback(self) -> None:
        """Restart the current round from its start (the helper was lost; replay its batches)."""
        self._require_round()
        log.info("owner %s: rolling back round %d after %d steps", self.config.node_id, self.round, self.step)
        self.start_round(self.round)

    def _require_round(self) -> None:
        if self.round < 0:
            raise SessionStateError("no round started: call start_round(r) first")

    def _require_open(self) -> None:
        self._require_round()
        if self.closed:
            raise SessionStateError(f"round {self.round} is closed by its contribution; fold or rollback first")

    # ---- one step ---------------------------------------------------------------------------
    def _unpack(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or not {"input_ids", "attention_mask", "labels"} <= set(batch):
            raise ValueError("batch: expected a mapping with input_ids, attention_mask and labels")
        ids = as_tensor(batch["input_ids"], "input_ids")
        mask = as_tensor(batch["attention_mask"], "attention_mask")
        if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"batch: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be (B, T)"
            )
        labels = check_labels(
            self.task, batch["labels"], ids.shape[0], ids.shape[1], num_classes(self.model, self.task)
        )
        return ids, mask, labels

    def forward(self, batch: Mapping[str, Any]) -> OwnerForward:
        """Run embeddings + blocks[:s] on ``batch`` (input_ids, attention_mask, labels).

        A forward not yet answered by ``backward`` is replaced (nothing was trained by it).
        """
        self._require_open()
        if self.local:
            raise SessionStateError("split == L: this owner trains alone, use local_step(batch)")
        ids, mask, labels = self._unpack(batch)
        self.model.train()
        with seeded(step_seed(self._seed, self.step, "owner"), model_device(self.model)):
            hidden = self._front(ids, mask)  # (B, T, H)
        mask = mask.to(torch.long)
        self._inflight = _InFlight(hidden, mask, labels)
        two_part = self.config.mode == "two-part"
        sent = hidden.detach()
        if self.config.activation_noise is not None:  # the helper's gradient flows back straight through
            sent = add_noise(sent, mask, self.config.activation_noise, self._noise_gen)
        return OwnerForward(self.round, self.step, sent, mask, labels if two_part else None)

    def finish(self, hidden) -> tuple[float, torch.Tensor]:
        """u-shape: final norm + head + loss on the helper's output ``hidden`` (B, T, H).

        Returns (loss, ∂L/∂hidden) for the helper's backward; the head's gradients wait for
        ``backward``. Calling it again for the same step recomputes (idempotent).
        """
        self._require_open()
        if self._tail is None:
            raise SessionStateError("finish() is for u-shape mode only")
        flight = self._inflight
        if flight is None:
            raise SessionStateError("finish() needs a forward() first")
        x = check_float(hidden, "hidden", model_dtype(self.model), shape=tuple(flight.hidden.shape)).to(
            model_device(self.model)
        )
        x.requires_grad_()
        for p in self._trainables():
            p.grad = None
        with seeded(step_seed(self._seed, self.step, "tail"), model_device(self.model)):
            loss, _ = self._tail(x, flight.mask, flight.labels)
        self._backward_finite(loss, "hidden", "head gradients")
        flight.finished, flight.loss = True, float(loss.detach())
        return float(loss.detach()), x.grad.detach()  # (B, T, H)

    def backward(self, grad, loss: float | None = None) -> None:
        """Apply the helper's gradient of the activations (B, T, H) and take one AdamW step.

        ``loss`` (what the helper reported) is only recorded in ``losses``.
        """
        self._require_open()
        flight = self._inflight
        if flight is None:
            raise SessionStateError("backward() needs a forward() first")
        if self._tail is not None and not flight.finished:
            raise SessionStateError("u-shape: call finish(hidden) before backward(grad)")
        g = check_float(grad, "grad", flight.hidden.dtype, shape=tuple(flight.hidden.shape)).to(
            model_device(self.model)
        )
        if self._tail is None:
            for p in self._trainables():
                p.grad = None
        flight.hidden.backward(g)
        self._inflight = None  # the graph is spent either way
        if not self._grads_finite():
            self._zero_grads()
            raise ValueError("grad: gives non-finite adapter gradients; step skipped")
        self._apply_step(flight.hidden.shape[0], flight.loss if flight.loss is not None else loss)

    def local_step(self, batch: Mapping[str, Any]) -> float:
        """split == L: one AdamW step of the whole model on ``batch``; returns the loss."""
        self._require_open()
        if not self.local:
            raise SessionStateError(f"split {self.config.split} < L: use forward/backward with a helper")
        ids, mask, labels = self._unpack(batch)
        self.model.train()
        for p in self._trainables():
            p.grad = None
        with seeded(step_seed(self._seed, self.step, "owner"), model_device(self.model)):
            loss, _ = unsplit_forward(self.model, ids, mask, labels)
        self._backward_finite(loss, "batch", "gradients; step skipped")
        self._apply_step(ids.shape[0], float(loss.detach()))
        return float(loss.detach())

    def _backward_finite(self, loss: torch.Tensor, source: str, grads: str) -> None:
        """Backpropagate a finite ``loss``; a non-finite loss, or non-finite gradients (then
        cleared), raise ValueError naming ``source``, the input they came from."""
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"{source}: gives a non-finite loss ({float(loss.detach())})")
        loss.backward()
        if not self._grads_finite():
            self._zero_grads()
            raise ValueError(f"{source}: gives non-finite {grads}")

    def _grads_finite(self) -> bool:
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self._trainables())

    def _zero_grads(self) -> None:
        for p in self._trainables():
            p.grad = None

    def _apply_step(self, batch_size: int, loss: float | None) -> None:
        self._optimizer.step()
        self._zero_grads()
        self.step += 1
        self.samples += int(batch_size)
        if loss is not None:
            self.losses.append(float(loss))

    # ---- end of round -----------------------------------------------------------------------
    def factors(self):
        """Copies of the owner-side factors: module name -> AdapterFactors (blocks[:s] only)."""
        return {m: f for m, f in get_factors(self.model).items() if m in self.modules}

    def head_delta(self) -> dict[str, torch.Tensor]:
        """Change of the owner's head copy since the round start (empty unless it runs the head)."""
        if not self.runs_head:
            return {}
        return {n: p.detach() - self._head_start[n] for n, p in head_params(self.model, ADAPTER).items()}

    def _check_helper(self, helper_factors, helper_dense) -> tuple[dict, dict]:
        helper_factors = {} if helper_factors is None else helper_factors
        helper_dense = {} if helper_dense is None else helper_dense
        if not isinstance(helper_factors, Mapping) or not isinstance(helper_dense, Mapping):
            raise ValueError("helper_factors/helper_dense: expected mappings of name -> tensors")
        if self.local and helper_factors:
            raise ValueError("helper_factors: this owner trains alone (split == L); expected none")
        if not self.local and not helper_factors:
            raise ValueError("helper_factors: required, the helper trained blocks[split:]")
        factors = {}
        for name, value in helper_factors.items():
            if not isinstance(name, str):
                raise ValueError(f"helper_factors: module names must be strings, got {name!r}")
            f = as_factors(_tensors_of(value, name), name)
            layer = layer_of(self.model, name)
            if layer is None or not self.config.split <= layer < self.num_layers:
                raise ValueError(f"helper_factors: {name!r} is not a module of blocks[{self.config.split}:]")
            shape = weight_shape(self.model, name)
            if f.shape != shape:
                raise ValueError(f"helper_factors[{name!r}]: update {f.shape} != weight {shape}")
            factors[name] = f
        expected = set() if self.runs_head else set(self.head_names)
        if set(helper_dense) != expected:
            raise ValueError(f"helper_dense: expected changes of {sorted(expected)}, got {sorted(helper_dense)}")
        dense = {}
        for name, value in helper_dense.items():
            t = as_tensor(value, f"helper_dense[{name!r}]")
            base = dense_base_param(self.model, name)
            if tuple(t.shape) != tuple(base.shape) or not t.dtype.is_floating_point:
                raise ValueError(f"helper_dense[{name!r}]: expected a float tensor of shape {tuple(base.shape)}")
            dense[name] = t
        return factors, dense

    def contribution(self, n_samples: int | None = None, helper_factors=None, helper_dense=None) -> Contribution:
        """This round's contribution over the WHOLE logical adapter, closing the round.

        Owner factors (blocks[:s]) + ``helper_factors`` (blocks[s:], what the helper returned) +
        the head's change over the round (``helper_dense`` from the helper in two-part mode, the
        owner's own otherwise), with ``n_samples`` (default: samples trained this round), mixed
        with any pending contribution. Calling it again rebuilds the same thing.
        """
        self._require_round()
        if self._inflight is not None:
            raise SessionStateError("a step is in flight; finish it (backward) or rollback first")
        if n_samples is None:
            n_samples = self.samples
        require_int("n_samples", n_samples, 0)
        factors, dense = self._check_helper(helper_factors, helper_dense)
        factors.update(self.factors())
        dense.update(self.head_delta())
        own = Contribution(factors, n_samples, str(self.config.node_id), self.round, dense)
        self._outgoing = carry_over(self.pending, own)
        return self._outgoing

    # ---- merge --------------------------------------------------------------------------------
    def rebase(self, base: VersionedBase, fork: int) -> None:
        """Move onto another history of the cluster (``VersionedBase.rebased``): take this log's
        patches after version ``fork`` back out of the weights, add ``base``'s, and start the
        round after its last patch fresh. A contribution sent but not in ``base`` stays pending."""
        if not isinstance(base, VersionedBase) or base.cluster != self.base.cluster:
            raise ValueError(f"base: expected a VersionedBase of cluster {self.base.cluster!r}")
        dropped, taken = self.base.missing_since(fork), base.missing_since(fork)
        for r in reversed(dropped):
            apply_to_model(self.model, r.patch, sign=-1.0)
        for r in taken:
            apply_to_model(self.model, r.patch)
        self.base = base
        out = self._outgoing
        if out is not None:
            merged = any(str(self.config.node_id) in r.patch.weights and r.patch.round >= out.round for r in taken)
            self.pending = None if merged else out
            self._outgoing = None
        log.info(  # the caller (nodes.cluster_sync.resync) warns, naming the versions
            "owner %s: cluster %s history replaced after version %d (%d patch(es) out, %d in)",
            self.config.node_id,
            base.cluster,
            fork,
            len(dropped),
            len(taken),
        )
        last = max((r.patch.round for r in base.records), default=self.round - 1)
        self.start_round(max(self.round, last + 1, 0))

    def fold(
        self,
        patch: Patch,
        *,
        version: int | None = None,
        digest: str | None = None,
        chain: str | None = None,
        discard_round: bool = False,
    ) -> PatchRecord | None:
        """Fold the cluster's exact patch into this node's base (all modules and the head base),
        then start the next round fresh.

        If this node's contribution is not among the patch's weights it stays pending and joins
        the next contribution. A round with steps but no contribution would lose its work, so it
        is refused unless ``discard_round``. A duplicate (already held version) changes nothing
        and returns None.
        """
        held = is_int(version) and version <= self.base.version
        if held:  # a duplicate of a folded version: checked against the log, changes nothing
            return fold_into(self.model, self.base, patch, version=version, digest=digest, chain=chain)
        if self.step > 0 and not self.closed and not discard_round:
            raise SessionStateError(
                f"round {self.round} has {self.step} steps but no contribution; call contribution() "
                "first (or pass discard_round=True)"
            )
        record = fold_into(self.model, self.base, patch, version=version, digest=digest, chain=chain)
        if record is None:
            return None
        out = self._outgoing
        if out is not None and out.round <= patch.round:
            merged = str(self.config.node_id) in patch.weights
            self.pending = None if merged else out
            self._outgoing = None
            if not merged:
                log.info(
                    "owner %s: contribution of round %d missed the manifest; carried over",
                    self.config.node_id,
                    out.round,
                )
        self.start_round(max(self.round, patch.round + 1))
        return record
