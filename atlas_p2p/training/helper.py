"""The helper's side of split training: blocks[s:] + head for each owner it serves (SplitLoRA's server).

One :class:`HelperSession` holds one replica of a cluster's base model and, on it, one peft
named adapter PER OWNER (``owner-<id>``), each with that owner's ranks on blocks[s_owner:] and,
in two-part mode, its own copy of a trainable head. Owners differ in split point and ranks;
the active adapter is switched per request, so their updates never mix.

Protocol per owner and round (docs/RUNTIME.md):

    begin(owner, r, split, ranks, seed)     idempotent for the same round and plan
    two-part:  step(owner, r, i, h, mask, labels) -> StepResult(grad of h, loss)
    u-shape:   u_forward(owner, r, i, h, mask) -> hidden;  u_backward(owner, r, i, g) -> grad of h
    return_adapter(owner, r) -> ServerAdapter (factors of blocks[s:] + head change)

Step 0 (re)starts the round from its reproducible start: A drawn from the owner's round seed
(``seeds.round_seed``; ``lora.reset_adapters`` mixes in each module name), B = 0, the head copy
at its base value, a fresh AdamW. Step i > 0 must follow step i-1; a gap, an unknown owner or
another round raises a :class:`~atlas_p2p.training.errors.ReplayNeeded` (the runtime answers
``error(replay)``). Repeating the last step with the same tensors returns the same answer
(a retried request is not trained twice). Bad tensors raise ``ValueError`` before anything
changes. ``fold(patch)`` adds the cluster's merged patch to the replica's base weights;
``base`` is its :class:`~atlas_p2p.versioning.VersionedBase`. :class:`HelperPool` keeps one
session (one replica) per cluster served.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from atlas_p2p.aggregation import AdapterFactors, Patch
from atlas_p2p.lora import add_lora_adapter, attach_lora, get_factors, reset_adapters
from atlas_p2p.models import SPLIT_MODES, family_of, num_layers, split_model, task_of, unwrap
from atlas_p2p.validation import is_int, require_int, require_number
from atlas_p2p.versioning import PatchRecord, VersionedBase

from .errors import RoundMismatchError, StepOrderError, UnknownOwnerError, VersionMismatchError
from .fold import fold_into
from .inputs import check_float, check_labels, check_mask
from .modules import (
    adapted_modules,
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
from .seeds import step_seed

__all__ = ["HelperConfig", "HelperPool", "HelperSession", "ServerAdapter", "StepResult"]

log = logging.getLogger(__name__)

_OWNER_ID = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass(frozen=True)
class HelperConfig:
    """How a helper trains the server-side adapters of one cluster's owners."""

    cluster: str = "0"  # cluster id of this replica's base-version log
    lr: float = 1e-3  # AdamW learning rate for owners whose begin() names none
    weight_decay: float = 0.0  # AdamW weight decay (the owners use the same)

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, str) or not self.cluster:
            raise ValueError(f"cluster: {self.cluster!r} must be a non-empty string")
        require_number("lr", self.lr, positive=True)
        require_number("weight_decay", self.weight_decay, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class StepResult:
    """The answer to a two-part step (a ``backward`` message)."""

    grad: torch.Tensor  # (B, T, H): ∂L/∂activations
    loss: float


@dataclasses.dataclass(frozen=True, eq=False)
class ServerAdapter:
    """What the helper hands back to an owner at the end of a round (``adapter_return``)."""

    owner_id: int | str
    round: int
    steps: int  # steps trained this round
    factors: dict[str, AdapterFactors]  # blocks[s:] module -> (A (r, d_in), B (d_out, r), scaling)
    dense: dict[str, torch.Tensor]  # head tensor -> change over the round (two-part seq_cls), else {}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The structure of an owner's server-side adapter: a change means a new peft adapter."""

    split: int
    mode: str
    ranks: tuple[tuple[str, int], ...]
    alpha: Any  # None, a float, or a sorted tuple of (module, alpha)


@dataclasses.dataclass(eq=False)
class _Slot:
    """One owner's server-side state."""

    name: str  # peft adapter name
    plan: _Plan
    part: nn.Module  # HelperPart (two-part) or MiddlePart (u-shape)
    modules: tuple[str, ...]
    round: int
    seed: int
    lr: float
    optimizer: torch.optim.Optimizer | None = None
    head_start: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    next: int = 0  # the step expected next
    dirty: bool = False  # trained since the last fresh start
    inflight: tuple | None = None  # u-shape: (step, input with grad, output)
    cache: tuple | None = None  # (step, inputs..., answer) of the last completed step


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class HelperSession:
    """A cluster's replica on a helper, with one server-side adapter per owner served."""

    def __init__(self, model: nn.Module, config: HelperConfig | None = None, base: VersionedBase | None = None) -> None:
        config = HelperConfig() if config is None else config
        if not isinstance(config, HelperConfig):
            raise ValueError(f"config: expected a HelperConfig, got {type(config).__name__}")
        if base is not None and not isinstance(base, VersionedBase):
            raise ValueError(f"base: expected a VersionedBase, got {type(base).__name__}")
        family_of(model)  # raises for an unsupported model
        self.config = config
        self.model = model  # becomes the PeftModel once the first owner begins (unless it already is one)
        self.task = task_of(model)
        self.num_layers = num_layers(model)
        self.base = base if base is not None else VersionedBase(config.cluster)
        self._slots: dict[str, _Slot] = {}
        self._active: str | None = None
        self._created = 0  # adapters ever created: each gets a fresh peft name
        self._orphans: list[str] = []  # adapters of dropped owners peft would not delete (its last one)

    # ---- state ----------------------------------------------------------------------------
    @property
    def cluster(self) -> str:
        return self.config.cluster

    @property
    def version(self) -> int:
        """The base version of this replica."""
        return self.base.version

    @property
    def owners(self) -> dict[str, tuple[int, int]]:
        """Owner key -> (round, next step expected)."""
        return {k: (s.round, s.next) for k, s in self._slots.items()}

    @staticmethod
    def _key(owner_id: int | str) -> str:
        if not (is_int(owner_id) or isinstance(owner_id, str)):
            raise ValueError(f"owner_id: {owner_id!r} must be an int or a string")
        key = str(owner_id)
        if not _OWNER_ID.fullmatch(key):
            raise ValueError(f"owner_id: {owner_id!r} must be >= 0 or a string of letters, digits, _ or -")
        return key

    # ---- begin --------------------------------------------------------------------------------
    def _plan(self, split, ranks, mode, alpha) -> _Plan:
        if not is_int(split) or not 1 <= split < self.num_layers:
            raise ValueError(f"split: {split!r} must be an int in 1..{self.num_layers - 1}")
        if mode not in SPLIT_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {SPLIT_MODES}")
        if not isinstance(ranks, Mapping):
            raise ValueError(f"ranks: expected a mapping module name -> rank, got {type(ranks).__name__}")
        mine = {}
        for name, r in ranks.items():
            if not isinstance(name, str):
                raise ValueError(f"ranks: module names must be strings, got {name!r}")
            layer = layer_of(self.model, name)
            if layer is None or layer >= self.num_layers:
                raise ValueError(f"ranks: {name!r} is not a module inside a transformer block")
            require_int(f"ranks[{name!r}]", r, 0)
            weight_shape(self.model, name)  # a Linear/Conv1D of this model, or ValueError
            if layer >= split and r > 0:
                mine[name] = r
        if not mine:
            raise ValueError(f"ranks: no positive rank on blocks[{split}:]; the helper would train nothing")
        if isinstance(alpha, Mapping):
            missing = sorted(set(mine) - set(alpha))
            if missing:
                raise ValueError(f"alpha: no value for modules {missing}")
            alpha = tuple(sorted((n, alpha[n]) for n in mine))
        elif alpha is not None:
            alpha = require_number("alpha", alpha, positive=True)
        return _Plan(split, mode, tuple(sorted(mine.items())), alpha)

    def adapter_name(self, owner_id: int | str) -> str:
        """The peft adapter name holding ``owner_id``'s server-side adapter (UnknownOwnerError if none)."""
        key = self._key(owner_id)
        if key not in self._slots:
            raise UnknownOwnerError(f"owner {key}: no server-side adapter here")
        return self._slots[key].name

    def _create(self, key: str, plan: _Plan, seed: int) -> _Slot:
        """A new peft adapter of ``plan`` for owner ``key`` (validated by lora before any change)."""
        self._created += 1
        name = f"owner-{key}-{self._created}"
        ranks = dict(plan.ranks)
        alpha = dict(plan.alpha) if isinstance(plan.alpha, tuple) else plan.alpha
        keep_head = None if plan.mode == "two-part" else []  # u-shape: the owner keeps the head
        if isinstance(self.model, PeftModel):
            add_lora_adapter(self.model, name, ranks, alpha=alpha, seed=seed, modules_to_save=keep_head)
        else:
            self.model = attach_lora(
                self.model, ranks, alpha=alpha, seed=seed, modules_to_save=keep_head, adapter_name=name
            )
        self._active = None
        part = split_model(self.model, plan.split, plan.mode)[1]
        modules = tuple(m for m in adapted_modules(self.model, name) if m in ranks)
        for orphan in self._orphans:  # now that another adapter exists, peft can delete them
            self._retire(orphan)
        self._orphans = []
        return _Slot(name, plan, part, modules, round=0, seed=seed, lr=self.config.lr)

    def _retire(self, name: str) -> None:
        """Delete a peft adapter; peft breaks when its last adapter goes, so that one stays, inert."""
        self._active = None
        if list(self.model.peft_config) == [name]:
            self._orphans.append(name)
            return
        keep = next(n for n in self.model.peft_config if n != name)
        self.model.set_adapter(keep)  # peft must never be left without an active adapter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.delete_adapter(name)

    def begin(
        self,
        owner_id: int | str,
        round: int,
        split: int,
        ranks: Mapping[str, int],
        seed: int,
        *,
        mode: str = "two-part",
        lr: float | None = None,
        alpha: float | Mapping[str, float] | None = None,
    ) -> bool:
        """Prepare ``owner_id``'s server-side adapter for ``round``; True if it (re)started it.

        ``split``: the owner runs blocks[:split]; ``ranks``: the owner's per-module plan (entries
        of blocks[:split] are ignored here); ``seed``: the owner's round seed. The same round with
        the same arguments is a no-op; a new round (or a new plan) starts fresh; an older round
        raises RoundMismatchError.
        """
        key = self._key(owner_id)
        round = require_int("round", round, 0)
        require_int("seed", seed)
        lr = self.config.lr if lr is None else require_number("lr", lr, positive=True)
        plan = self._plan(split, ranks, mode, alpha)
        slot = self._slots.get(key)
        if slot is not None:
            if round < slot.round:
                raise RoundMismatchError(f"owner {key}: begin for round {round} but round {slot.round} is running")
            if (round, plan, seed, lr) == (slot.round, slot.plan, slot.seed, slot.lr):
                return False
        if slot is None or plan != slot.plan:
            old, slot = slot, self._create(key, plan, seed)
            self._slots[key] = slot
            if old is not None:
                self._retire(old.name)
        slot.round, slot.seed, slot.lr = round, seed, lr
        self._fresh(slot)
        log.debug("helper: owner %s round %d begins (split %d, %s)", key, round, plan.split, plan.mode)
        return True

    def _fresh(self, slot: _Slot) -> None:
        reset_adapters(self.model, slot.seed, adapter_name=slot.name)
        slot.head_start = reset_head(self.model, slot.name)
        params = lora_params(self.model, slot.modules, slot.name) + list(head_params(self.model, slot.name).values())
        slot.optimizer = torch.optim.AdamW(params, lr=slot.lr, weight_decay=self.config.weight_decay)
        slot.next, slot.dirty, slot.inflight, slot.cache = 0, False, None, None

    def drop(self, owner_id: int | str) -> None:
        """Forget an owner (re-paired elsewhere or gone); unknown owners are ignored."""
        key = self._key(owner_id)
        if key in self._slots:
            self._retire(self._slots.pop(key).name)

    # ---- steps ----------------------------------------------------------------------------------
    def _slot(self, owner_id, round, base_version, mode: str | None) -> _Slot:
        key = self._key(owner_id)
        round = require_int("round", round, 0)
        slot = self._slots.get(key)
        if slot is None:
            raise UnknownOwnerError(f"owner {key}: no server-side adapter here (begin the round first)")
        if base_version is not None and require_int("base_version", base_version, 0) != self.version:
            raise VersionMismatchError(self.version, base_version)
        if round != slot.round:
            raise RoundMismatchError(f"owner {key}: request for round {round} but round {slot.round} is held")
        if mode is not None and slot.plan.mode != mode:
            raise ValueError(f"owner {key}: begun in {slot.plan.mode} mode, request is {mode}")
        return slot

    def _activate(self, slot: _Slot) -> None:
        if self._active != slot.name:
            self.model.set_adapter(slot.name)
            self._active = slot.name
        self.model.train()

    def _inputs(self, activations, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        h = check_float(
            activations, "activations", model_dtype(self.model), hidden=int(unwrap(self.model).config.hidden_size)
        )
        mask = check_mask(attention_mask, h.shape[0], h.shape[1])
        return h, mask

    def _params(self, slot: _Slot) -> list[torch.nn.Parameter]:
        return [p for group in slot.optimizer.param_groups for p in group["params"]]

    def _finish_step(self, slot: _Slot, step: int) -> None:
        params = self._params(slot)
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
            for p in params:
                p.grad = None
            raise ValueError("activations/grad: give non-finite adapter gradients; step skipped")
        slot.optimizer.step()
        for p in params:
            p.grad = None
        slot.next, slot.dirty = step + 1, True

    def _order(self, slot: _Slot, step: int) -> None:
        """Step ``step`` may run now (restarting the round at step 0), else StepOrderError."""
        step = require_int("step", step, 0)
        if step == 0:
            if slot.dirty or slot.inflight is not None:
                self._fresh(slot)
            return
        if step != slot.next:
            raise StepOrderError(f"round {slot.round}: expected step {slot.next}, got step {step}")

    def step(self, owner_id, round, step, activations, attention_mask, labels, *, base_version=None) -> StepResult:
        """Two-part step: blocks[s:] + head + loss on the owner's activations (B, T, H), backward,
        one AdamW step of the owner's server-side adapter; returns ∂L/∂activations and the loss."""
        slot = self._slot(owner_id, round, base_version, "two-part")
        h, mask = self._inputs(activations, attention_mask)
        y = check_labels(self.task, labels, h.shape[0], h.shape[1], num_classes(self.model, self.task))
        cache = slot.cache
        if cache is not None and step == cache[0] == slot.next - 1:
            if _same(h, cache[1]) and _same(mask, cache[2]) and _same(y, cache[3]):
                return cache[4]  # a retried request: same answer, not trained twice
            raise StepOrderError(f"round {slot.round}: step {step} was already run with other tensors")
        self._order(slot, step)
        self._activate(slot)
        device = model_device(self.model)
        x = h.to(device).requires_grad_()
        with seeded(step_seed(slot.seed, step, "helper"), device):
            loss, _ = slot.part(x, mask.to(device), y.to(device))
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"activations: give a non-finite loss ({float(loss.detach())})")
        for p in self._params(slot):
            p.grad = None
        loss.backward()
        self._finish_step(slot, step)
        result = StepResult(x.grad.detach(), float(loss.detach()))
        slot.cache = (step, h, mask, y, result)
        return result

    def u_forward(self, owner_id, round, step, activations, attention_mask, *, base_version=None) -> torch.Tensor:
        """u-shape, first half: blocks[s:L] on the owner's activations -> hidden states (B, T, H)
        for the owner's head. Repeating the pending step recomputes it."""
        slot = self._slot(owner_id, round, base_version, "u-shape")
        h, mask = self._inputs(activations, attention_mask)
        if slot.inflight is not None and slot.inflight[0] == step and step == slot.next:
            slot.inflight = None  # a retried forward: recompute it
        self._order(slot, step)
        self._activate(slot)
        device = model_device(self.model)
        x = h.to(device).requires_grad_()
        with seeded(step_seed(slot.seed, step, "helper"), device):
            out = slot.part(x, mask.to(device))  # (B, T, H)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("activations: give non-finite hidden states")
        slot.inflight = (step, x, out)
        return out.detach()

    def u_backward(self, owner_id, round, step, grad, *, base_version=None) -> torch.Tensor:
        """u-shape, second half: backward of the owner's ∂L/∂hidden (B, T, H) through blocks[s:L],
        one AdamW step; returns ∂L/∂activations."""
        slot = self._slot(owner_id, round, base_version, "u-shape")
        step = require_int("step", step, 0)
        cache = slot.cache
        if slot.inflight is None or slot.inflight[0] != step:
            if cache is not None and step == cache[0] == slot.next - 1:
                g = check_float(grad, "grad", model_dtype(self.model), shape=tuple(cache[1].shape))
                if _same(g, cache[1]):
                    return cache[2]
            raise StepOrderError(f"round {slot.round}: no forward pending for step {step}")
        _, x, out = slot.inflight
        g = check_float(grad, "grad", out.dtype, shape=tuple(out.shape))
        self._activate(slot)
        for p in self._params(slot):
            p.grad = None
        out.backward(g.to(out.device))
        slot.inflight = None  # the graph is spent either way
        self._finish_step(slot, step)
        answer = x.grad.detach()
        slot.cache = (step, g, answer)
        return answer

    # ---- end of round ------------------------------------------------------------------------------
    def return_adapter(self, owner_id: int | str, round: int) -> ServerAdapter:
        """The owner's server-side factors (blocks[s:]) and head change over ``round`` (copies)."""
        slot = self._slot(owner_id, round, None, None)
        factors = {m: f for m, f in get_factors(self.model, slot.name).items() if m in slot.modules}
        dense = {n: p.detach() - slot.head_start[n] for n, p in head_params(self.model, slot.name).items()}
        return ServerAdapter(owner_id, slot.round, slot.next, factors, dense)

    def fold(
        self, patch: Patch, *, version: int | None = None, digest: str | None = None, chain: str | None = None
    ) -> PatchRecord | None:
        """Fold the cluster's merged patch into this replica's base weights (and head base).

        Owners' running adapters are untouched; their next round starts on the new base.
        Returns the new version's record, or None for a duplicate.
        """
        return fold_into(self.model, self.base, patch, version=version, digest=digest, chain=chain)


class HelperPool:
    """The replicas a helper node runs: one :class:`HelperSession` per cluster it serves."""

    def __init__(self) -> None:
        self._sessions: dict[str, HelperSession] = {}

    @property
    def clusters(self) -> list[str]:
        return sorted(self._sessions)

    def add(self, session: HelperSession) -> HelperSession:
        """Serve a new cluster with ``session`` (ValueError if the cluster is already served)."""
        if not isinstance(session, HelperSession):
            raise ValueError(f"session: expected a HelperSession, got {type(session).__name__}")
        if session.cluster in self._sessions:
            raise ValueError(f"cluster {session.cluster!r} is already served")
        self._sessions[session.cluster] = session
        return session

    def get(self, cluster: str) -> HelperSession:
        try:
            return self._sessions[cluster]
        except KeyError:
            raise ValueError(f"cluster {cluster!r} is not served here (serving {self.clusters})") from None

    def remove(self, cluster: str) -> None:
        self._sessions.pop(cluster, None)

    def for_owner(self, owner_id: int | str) -> HelperSession:
        """The replica holding ``owner_id``'s server-side adapter; UnknownOwnerError if none."""
        key = HelperSession._key(owner_id)
        for session in self._sessions.values():
            if key in session.owners:
                return session
        raise UnknownOwnerError(f"owner {key}: not served by any replica here")
