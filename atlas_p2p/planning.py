"""Budget-aware plan: split points, LoRA ranks and owner-helper pairing (DESIGN 7).

Pure and deterministic: `NodeInfo` records (and the cluster importance vectors and
centroids) in, a `Plan` out; ties are broken by node id and model order.

1. Split point. A data node that can train the whole model within `headroom` (80%) of
   its memory trains alone (split L). Otherwise its split is the deepest l whose owner
   footprint (memory.owner_footprint, with the minimum adapters) fits, clipped to
   [l_min, L-1]; l_min is the privacy floor. A node for which no such l exists waits.
   (The footprint is memory.owner_footprint with the minimum adapters.)
2. Ranks (HSplitLoRA's water-filling). From Q = {0, 2, 4, 8, 16}: reserve the smallest
   positive rank for the most important weight of every hosted block (at least one
   adapter per block), then visit weights by decreasing importance and give each the
   largest rank whose bytes (4 copies: parameter, gradient, two AdamW moments) still fit
   the adapter budget. The budget is what the device has left at its split, capped at
   `adapter_share` of its memory, so within a cluster (one importance vector) every
   member gets the same pattern at a size set by its budget.
3. Pairing. Owners (nodes that split) get a helper that already holds the later layers:
   a node training the whole model, or a pure helper (no data). First-fit decreasing:
   owners with the largest demand first; a helper is feasible when its budget still
   fits its own training plus the rest of the model and the adapter and activations of
   every owner it serves (memory.helper_footprint). Preference: same cluster, then
   unclustered pure helpers, then other clusters by centroid distance; among equals,
   the largest share of bandwidth and compute per served owner, then free memory, then
   node id. Fallbacks are the other feasible helpers in the same order. An owner with
   no feasible helper anywhere waits, with the reason in its row.
4. Helper-side ranks. Each helper's left-over adapter budget is shared among the owners
   it serves in proportion to their minimum adapters, and each owner's weights in
   blocks[split:] are water-filled in it.

`repair` swaps out dead helpers while changing nothing else; `replan_reason` says when a
full re-plan is due (membership, budgets, or importance moved by more than τ).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.importance import TAU
from atlas_p2p.memory import (
    ADAM_COPIES,
    ActivationConstants,
    Footprint,
    LoraModule,
    ModelShape,
    ServedOwner,
    Workload,
    helper_footprint,
    helper_weights_bytes,
    lora_candidates,
    owner_footprint,
    served_owner_footprint,
    whole_model_footprint,
)
from atlas_p2p.validation import require_bool, require_int
from atlas_p2p.vocabulary import HELPER, OWNER, WAITING, WHOLE

log = logging.getLogger(__name__)

RANK_SET = (0, 2, 4, 8, 16)


@dataclass(frozen=True)
class NodeInfo:
    """What the planner knows about one device: its offer and its task cluster."""

    node_id: str
    caps: Capabilities  # memory (bytes), bandwidth (bit/s), compute, has_data
    cluster: int | None  # task cluster; None for a pure helper nobody clustered
    # whether the operator lets this device run other owners' layers (a helper sees their
    # activations, and labels in two-part mode); False: it trains its own data only
    may_host: bool = True
    # privacy floor of this node's own data (privacy_min_split of the leakage it measured):
    # blocks it must run before sending; the plan uses the larger of this and PlanConfig.min_split
    min_split: int = 1

    def __post_init__(self):
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id={self.node_id!r}: must be a non-empty string")
        require_bool("may_host", self.may_host)
        require_int("min_split", self.min_split, 1)
        if not isinstance(self.caps, Capabilities):
            raise ValueError(f"caps={self.caps!r:.80}: must be a Capabilities")
        if self.cluster is not None:
            require_int("cluster", self.cluster, 0)
        if self.caps.has_data and self.cluster is None:
            raise ValueError(f"cluster=None: node {self.node_id!r} has data and needs a cluster")


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of the planner."""

    headroom: float = 0.8  # share of a device's memory a plan may fill
    rank_set: tuple[int, ...] = RANK_SET  # ranks a weight may get, 0 = no adapter
    min_split: int = 1  # privacy floor l_min: blocks an owner must run before sending
    adapter_share: float = 0.02  # at most this share of memory for a device's own adapters (+ grads, AdamW)
    max_fallbacks: int = 3  # length of each owner's fallback list
    split_all: bool = False  # split every data node, even one that could train alone
    u_shape: bool = False  # owners keep the head and the labels (DESIGN 4 split modes)
    fixed_split: int | None = None  # SplitLoRA's one cut: every data node owns this many blocks (clipped to L-1)
    uniform_rank: int | None = None  # SplitLoRA's one rank: every candidate weight, whatever the budget

    def __post_init__(self):
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom={self.headroom!r}: must be in (0, 1]")
        ranks = self.rank_set
        if (
            not ranks
            or list(ranks) != sorted(set(ranks))
            or ranks[0] != 0
            or len(ranks) < 2
            or not all(isinstance(r, int) for r in ranks)
        ):
            raise ValueError(f"rank_set={ranks!r}: must be increasing ints starting at 0 with a positive rank")
        if not isinstance(self.min_split, int) or self.min_split < 1:
            raise ValueError(f"min_split={self.min_split!r}: must be an int >= 1")
        if not 0 < self.adapter_share <= 1:
            raise ValueError(f"adapter_share={self.adapter_share!r}: must be in (0, 1]")
        if not isinstance(self.max_fallbacks, int) or self.max_fallbacks < 0:
            raise ValueError(f"max_fallbacks={self.max_fallbacks!r}: must be an int >= 0")
        for name in ("fixed_split", "uniform_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: must be None or an int >= 1")


@dataclass(frozen=True)
class PlanContext:
    """The model and step the plan is made for."""

    shape: ModelShape
    workload: Workload
    config: PlanConfig = PlanConfig()
    constants: ActivationConstants | None = None  # None: the family's calibrated constants

    def __post_init__(self):
        if self.config.min_split > self.shape.num_layers - 1:
            raise ValueError(f"min_split={self.config.min_split}: must be <= L-1 = {self.shape.num_layers - 1}")


@dataclass(frozen=True)
class NodePlan:
    """One row of the plan (what the peer table shows)."""

    node_id: str
    cluster: int | None
    role: str  # WHOLE | OWNER | HELPER | WAITING
    split: int | None  # blocks run as owner (L for WHOLE); None for HELPER
    ranks: Mapping[str, int]  # the node's logical adapter, helper-side weights included
    helper: str | None  # node hosting blocks[split:] for it
    fallbacks: tuple[str, ...]  # helpers to try, in order, if `helper` fails
    serves: tuple[str, ...]  # owners it hosts later layers for
    reason: str  # short human explanation


@dataclass(frozen=True)
class Plan:
    """The plan for every node, with the inputs it was made from."""

    nodes: Mapping[str, NodePlan]  # node id -> row
    context: PlanContext
    infos: Mapping[str, NodeInfo]

    def __getitem__(self, node_id: str) -> NodePlan:
        return self.nodes[node_id]


# ------------------------------------------------------------------ small helpers


def _in_unit(value: float, units: Sequence[tuple[str, float]]) -> str | None:
    """`value` in the first of `units` (name, size; largest first) it reaches, with one
    decimal below 10 and none above; None when it reaches none."""
    for unit, size in units:
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f} {unit}" if scaled < 10 else f"{scaled:.0f} {unit}"
    return None


def format_bytes(n: float) -> str:
    """1.1 GB, 300 MB, 12 KB (decimal units)."""
    return _in_unit(n, (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))) or f"{int(n)} B"


def format_bps(bps: float) -> str:
    """100 Mbps, 1.5 Gbps."""
    return _in_unit(bps, (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3))) or f"{bps:.0f} bps"


def privacy_min_split(leakage_by_split: Sequence[float], floor: float) -> int:
    """Smallest split l >= 1 whose leakage (index l of the sequence) is <= `floor`.

    Leakage is DESIGN 10's Fisher meter ψ(l) of the owner part ending at block l.
    """
    for l in range(1, len(leakage_by_split)):
        if leakage_by_split[l] <= floor:
            return l
    raise ValueError(
        f"floor={floor!r}: no split point leaks that little "
        f"(lowest leakage {min(leakage_by_split[1:], default=math.inf)!r})"
    )


def _adapter_cost(module: LoraModule, rank: int, workload: Workload) -> int:
    return ADAM_COPIES * workload.lora_bytes * rank * module.rank1_cost


def _order(modules: Sequence[LoraModule], importance: Mapping[str, float]) -> list[LoraModule]:
    """Decreasing importance; ties go kind by kind across blocks (every block's first
    weight, then every block's second, ...), so equal scores spread rank over blocks."""
    position: dict[str, tuple[int, int]] = {}
    seen: dict[int, int] = {}
    for m in modules:
        position[m.name] = (seen.get(m.block, 0), m.block)
        seen[m.block] = seen.get(m.block, 0) + 1
    return sorted(modules, key=lambda m: (-importance.get(m.name, 0.0), position[m.name]))


def _anchors(modules: Sequence[LoraModule], importance: Mapping[str, float]) -> dict[int, LoraModule]:
    """The most important weight of each block (it keeps the block's one adapter)."""
    anchors: dict[int, LoraModule] = {}
    for m in _order(modules, importance):
        anchors.setdefault(m.block, m)
    return anchors


def minimum_ranks(
    modules: Sequence[LoraModule], importance: Mapping[str, float], rank_set: Sequence[int] = RANK_SET
) -> dict[str, int]:
    """One adapter of the smallest positive rank per block, on its most important weight."""
    q_min = min(r for r in rank_set if r > 0)
    return {m.name: q_min for m in _anchors(modules, importance).values()}


def fits_whole_model(
    shape: ModelShape, memory_bytes: int, workload: Workload, config: PlanConfig | None = None
) -> bool:
    """Whether a device of `memory_bytes` trains the whole model with the smallest adapters
    (`minimum_ranks`) within the plan's headroom: it may run alone and host others' later
    blocks; below this it needs a helper, for its fingerprint too."""
    config = config or PlanConfig()
    need = whole_model_footprint(shape, minimum_ranks(lora_candidates(shape), {}, config.rank_set), workload)
    return need.total <= int(memory_bytes * config.headroom)


def water_fill(
    modules: Sequence[LoraModule],
    importance: Mapping[str, float],
    budget_bytes: int,
    workload: Workload,
    rank_set: Sequence[int] = RANK_SET,
) -> dict[str, int]:
    """Ranks by decreasing importance, each the largest of `rank_set` that still fits.

    The smallest positive rank is reserved first for each block's most important
    weight, so every block hosted keeps at least one adapter. Returns every module of
    `modules` (rank 0 = no adapter). Raises ValueError if the reservations do not fit.
    """
    ranks = sorted(rank_set)
    if ranks[0] != 0:
        raise ValueError(f"rank_set={tuple(rank_set)!r}: must contain 0")
    q_min = min(r for r in ranks if r > 0)
    reserved = {m.name: _adapter_cost(m, q_min, workload) for m in _anchors(modules, importance).values()}
    remaining = budget_bytes - sum(reserved.values())
    if remaining < 0:
        raise ValueError(
            f"budget_bytes={budget_bytes}: cannot give each of {len(reserved)} blocks "
            f"one rank-{q_min} adapter (needs {sum(reserved.values())})"
        )
    out: dict[str, int] = {}
    for m in _order(modules, importance):
        available = remaining + reserved.get(m.name, 0)
        rank = max(r for r in ranks if _adapter_cost(m, r, workload) <= available)
        out[m.name] = rank
        remaining = available - _adapter_cost(m, rank, workload)
    return {m.name: out[m.name] for m in modules}


def _centroid_distance(centroids: Mapping[int, Sequence[float]] | None, a: int | None, b: int | None) -> float:
    if a == b:
        return 0.0
    if centroids is None or a not in centroids or b not in centroids:
        return math.inf
    ca, cb = centroids[a], centroids[b]
    if len(ca) != len(cb):
        raise ValueError(f"centroids: cluster {a} has {len(ca)} dims, cluster {b} has {len(cb)}")
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(ca, cb)))


# ------------------------------------------------------------------ the planner


@dataclass
class _Helper:
    """A node that can host later layers, and what it hosts so far (mutable while planning)."""

    info: NodeInfo
    capacity: int  # bytes it may fill
    own: Footprint  # its own training (zero for a pure helper)
    holds_weights: bool  # already holds every layer (trains the whole model)
    served: dict[str, ServedOwner] = field(default_factory=dict)
    # (owners served, their summed footprint, shallowest split, any head): `used` is asked
    # for every (owner, helper) pair while planning, the served set changes far more rarely
    _sum: tuple[tuple, int, int | None, bool] = field(default=((), 0, None, False), repr=False)

    def used(self, ctx: PlanContext, extra: ServedOwner | None = None) -> int:
        """own + memory.helper_footprint(served owners, and `extra`), its sum kept between calls."""
        key = tuple(self.served.items())  # an owner's demand may be replaced under the same id
        if self._sum[0] != key:
            owners = self.served.values()
            total = sum(served_owner_footprint(ctx.shape, o, ctx.constants).total for o in owners)
            first = min((o.split for o in owners), default=None)
            self._sum = (key, total, first, any(o.head for o in owners))
        _, total, first, head = self._sum
        if extra is not None:
            total += served_owner_footprint(ctx.shape, extra, ctx.constants).total
            first = extra.split if first is None else min(first, extra.split)
            head = head or extra.head
        weights = 0
        if first is not None and not self.holds_weights:
            weights = helper_weights_bytes(ctx.shape, first, ctx.workload.weight_bytes, head)
        return self.own.total + weights + total

    def fits(self, ctx: PlanContext, owner: ServedOwner) -> bool:
        return self.used(ctx, owner) <= self.capacity


def _budget(info: NodeInfo, config: PlanConfig) -> int:
    return int(info.caps.memory_bytes * config.headroom)


def _allowance(info: NodeInfo, config: PlanConfig, spare: int, minimum: int) -> int:
    """Adapter bytes for a device: what is left at its split, capped at `adapter_share`
    of its memory, never below the minimum adapters the split was chosen with."""
    return max(minimum, min(spare, int(config.adapter_share * info.caps.memory_bytes)))


def _serving_reason(role: str, info: NodeInfo, num_layers: int) -> str:
    """Base reason of a node that can host later layers (WHOLE or HELPER)."""
    mem = format_bytes(info.caps.memory_bytes)
    if role == WHOLE:
        return f"whole model {num_layers}/{num_layers}: {mem} budget"
    return f"helper: {mem} budget"


def _importance_for(importance: Mapping | None, cluster: int | None) -> Mapping[str, float]:
    if importance is None or cluster not in importance:
        return {}
    return importance[cluster]


def _solo(
    info: NodeInfo, ctx: PlanContext, imp: Mapping[str, float]
) -> tuple[str, int | None, dict, str, Footprint | None]:
    """Role, split, own-side ranks, reason and own footprint of one node before pairing."""
    shape, work, cfg = ctx.shape, ctx.workload, ctx.config
    budget, L = _budget(info, cfg), shape.num_layers
    modules = lora_candidates(shape)
    mem = format_bytes(info.caps.memory_bytes)
    if not info.caps.has_data:
        return HELPER, None, {}, _serving_reason(HELPER, info, L), None
    if cfg.fixed_split is not None:
        return _fixed(info, ctx, imp)
    if not cfg.split_all:
        base = whole_model_footprint(shape, minimum_ranks(modules, imp, cfg.rank_set), work, ctx.constants)
        if base.total <= budget:
            allowance = _allowance(info, cfg, budget - base.frozen - base.activations, base.adapter)
            ranks = _assign_ranks(modules, imp, allowance, ctx)
            full = whole_model_footprint(shape, ranks, work, ctx.constants)
            return WHOLE, L, ranks, _serving_reason(WHOLE, info, L), full
    fitting = None
    for l in range(L - 1, 0, -1):
        hosted = [m for m in modules if m.block < l]
        need = owner_footprint(
            shape, l, minimum_ranks(hosted, imp, cfg.rank_set), work, ctx.constants, with_head=cfg.u_shape
        )
        if need.total <= budget:
            fitting = (l, hosted, need)
            break
    if fitting is None:
        one = owner_footprint(
            shape,
            1,
            minimum_ranks([m for m in modules if m.block < 1], imp, cfg.rank_set),
            work,
            ctx.constants,
            with_head=cfg.u_shape,
        )
        return (
            WAITING,
            None,
            {},
            f"waiting: {mem} budget cannot fit 1 block (needs {format_bytes(one.total / cfg.headroom)})",
            None,
        )
    l, hosted, need = fitting
    floor = max(cfg.min_split, info.min_split)
    if l < floor:
        return (WAITING, None, {}, f"waiting: {mem} budget fits {l}/{L} blocks, privacy floor needs {floor}", None)
    allowance = _allowance(info, cfg, budget - need.frozen - need.activations, need.adapter)
    ranks = _assign_ranks(hosted, imp, allowance, ctx)
    return OWNER, l, ranks, _split_reason(info, l, L), None


def _assign_ranks(
    modules: Sequence[LoraModule], imp: Mapping[str, float], allowance: int, ctx: PlanContext
) -> dict[str, int]:
    """Water-filled ranks, or every module at the uniform rank when the plan fixes one."""
    if ctx.config.uniform_rank is not None:
        return {m.name: ctx.config.uniform_rank for m in modules}
    return water_fill(modules, imp, allowance, ctx.workload, ctx.config.rank_set)


def _fixed(info: NodeInfo, ctx: PlanContext, imp: Mapping[str, float]) -> tuple[str, int | None, dict, str, None]:
    """An owner at the plan's fixed split, or waiting when its budget cannot run those blocks."""
    shape, cfg = ctx.shape, ctx.config
    L, split = shape.num_layers, min(cfg.fixed_split, shape.num_layers - 1)
    hosted = [m for m in lora_candidates(shape) if m.block < split]
    minimum = minimum_ranks(hosted, imp, cfg.rank_set)  # the budget test every split takes
    need = owner_footprint(shape, split, minimum, ctx.workload, ctx.constants, with_head=cfg.u_shape)
    if split < info.min_split:
        return (
            WAITING,
            None,
            {},
            f"waiting: the fixed split {split}/{L} is below its privacy floor {info.min_split}",
            None,
        )
    if need.total > _budget(info, cfg):
        mem = format_bytes(info.caps.memory_bytes)
        return WAITING, None, {}, f"waiting: {mem} budget cannot run the fixed split of {split}/{L} blocks", None
    allowance = _allowance(info, cfg, _budget(info, cfg) - need.frozen - need.activations, need.adapter)
    ranks = _assign_ranks(hosted, imp, allowance, ctx)
    return OWNER, split, ranks, _split_reason(info, split, L), None


def _split_reason(info: NodeInfo, split: int, num_layers: int) -> str:
    return f"split {split}/{num_layers}: {format_bytes(info.caps.memory_bytes)} budget"


def _tail(ctx: PlanContext, split: int) -> list[LoraModule]:
    return [m for m in lora_candidates(ctx.shape) if m.block >= split]


def _tail_floor(ctx: PlanContext, split: int, importance: Mapping[str, float]) -> dict[str, int]:
    """The tail ranks a helper must hold for an owner before its left-over budget is shared:
    the plan's one rank on every weight when it fixes one (SplitLoRA's clients all train the
    same modules, which its factor average needs), else one smallest adapter per block."""
    if ctx.config.uniform_rank is not None:
        return _assign_ranks(_tail(ctx, split), importance, 0, ctx)
    return minimum_ranks(_tail(ctx, split), importance, ctx.config.rank_set)


def _rank_helpers(
    owner: NodeInfo,
    helpers: Iterable[_Helper],
    ctx: PlanContext,
    demand: ServedOwner,
    centroids,
    tiers: tuple[int, ...],
) -> list[_Helper]:
    """Feasible helpers for `owner` in preference order (only the given tiers).

    Tier 0: same cluster; 1: unclustered pure helpers; 2: other clusters.
    """
    ranked = []
    for h in helpers:
        if h.info.node_id == owner.node_id or not h.fits(ctx, demand):
            continue
        if h.info.cluster == owner.cluster:
            tier = 0
        elif h.info.cluster is None:
            tier = 1
        else:
            tier = 2
        if tier not in tiers:
            continue
        share = len(h.served) + 1
        key = (
            tier,
            _centroid_distance(centroids, owner.cluster, h.info.cluster),
            -h.info.caps.bandwidth_bps / share,
            -h.info.caps.compute_score / share,
            -(h.capacity - h.used(ctx)),
            h.info.node_id,
        )
        ranked.append((key, h))
    return [h for _, h in sorted(ranked, key=lambda kv: kv[0])]


def _helper_note(h: _Helper, owner: NodeInfo, centroids) -> str:
    note = (
        f"helper {h.info.node_id} ({format_bytes(h.info.caps.memory_bytes)}, {format_bps(h.info.caps.bandwidth_bps)})"
    )
    if h.info.cluster is not None and h.info.cluster != owner.cluster:
        note += f" from cluster {h.info.cluster}"
    return note


def _demand(ctx: PlanContext, split: int, ranks: Mapping[str, int]) -> ServedOwner:
    tail = {n: r for n, r in ranks.items() if r > 0 and n in {m.name for m in _tail(ctx, split)}}
    return ServedOwner(split=split, workload=ctx.workload, ranks=tail, head=not ctx.config.u_shape)


def _fill_helper_ranks(h: _Helper, ctx: PlanContext, rows: dict[str, dict], importance: Mapping | None) -> None:
    """Share `h`'s left-over adapter budget among its owners and water-fill their tails."""
    if not h.served:
        return
    leftover = h.capacity - h.used(ctx)  # with the minimum adapters already counted
    minimum = {
        o: helper_footprint(
            ctx.shape, [s], weight_bytes=ctx.workload.weight_bytes, holds_weights=True, constants=ctx.constants
        ).adapter
        for o, s in h.served.items()
    }
    pool = min(leftover + sum(minimum.values()), int(ctx.config.adapter_share * h.info.caps.memory_bytes))
    total_min = sum(minimum.values()) or 1
    for owner_id in sorted(h.served):
        row = rows[owner_id]
        share = max(minimum[owner_id], pool * minimum[owner_id] // total_min)
        imp = _importance_for(importance, row["cluster"])
        tail_ranks = _assign_ranks(_tail(ctx, row["split"]), imp, share, ctx)
        row["ranks"] = {**row["ranks"], **tail_ranks}
        h.served[owner_id] = _demand(ctx, row["split"], row["ranks"])


def make_plan(
    infos: Sequence[NodeInfo],
    context: PlanContext,
    importance: Mapping[int, Mapping[str, float]] | None = None,
    centroids: Mapping[int, Sequence[float]] | None = None,
) -> Plan:
    """Split, ranks, helper and fallbacks for every node (see the module docstring).

    `importance`: cluster -> normalised importance {module: score} (uniform when
    missing); `centroids`: cluster -> centroid vector, orders cross-cluster helpers.
    """
    by_id = _index(infos)
    cfg = context.config
    rows: dict[str, dict] = {}
    helpers: dict[str, _Helper] = {}
    for node_id in sorted(by_id):
        info = by_id[node_id]
        imp = _importance_for(importance, info.cluster)
        role, split, ranks, reason, own = _solo(info, context, imp)
        rows[node_id] = dict(
            cluster=info.cluster, role=role, split=split, ranks=ranks, helper=None, fallbacks=(), reason=reason
        )
        if role in (WHOLE, HELPER) and info.may_host:
            helpers[node_id] = _Helper(info, _budget(info, cfg), own or Footprint(0, 0, 0), role == WHOLE)

    order = _pair(
        [n for n in sorted(rows) if rows[n]["role"] == OWNER], rows, helpers, by_id, context, importance, centroids
    )
    for h in sorted(helpers.values(), key=lambda h: h.info.node_id):
        _fill_helper_ranks(h, context, rows, importance)
    for n in order:
        if rows[n]["role"] == OWNER:
            rows[n]["fallbacks"] = _fallbacks(by_id[n], rows[n], helpers, context, centroids)
    plan = _assemble(rows, helpers, context, by_id)
    log.info(
        "plan for %d nodes: %s",
        len(rows),
        {role: sum(r.role == role for r in plan.nodes.values()) for role in (WHOLE, OWNER, HELPER, WAITING)},
    )
    return plan


def _pair(
    owners: Sequence[str],
    rows: dict[str, dict],
    helpers: Mapping[str, _Helper],
    by_id: Mapping[str, NodeInfo],
    ctx: PlanContext,
    importance: Mapping | None,
    centroids,
) -> list[str]:
    """Give each of `owners` (rows with a split, no helper) a helper, first-fit decreasing on
    the helper memory it needs with minimum tail ranks: own cluster and pure helpers
    everywhere first, then other clusters. Owners none can host become WAITING (split and
    own ranks kept); returns the owners in pairing order."""
    demands = {}
    for n in owners:
        imp = _importance_for(importance, rows[n]["cluster"])
        demands[n] = _demand(ctx, rows[n]["split"], {**rows[n]["ranks"], **_tail_floor(ctx, rows[n]["split"], imp)})
    size = {
        n: helper_footprint(
            ctx.shape, [demands[n]], weight_bytes=ctx.workload.weight_bytes, constants=ctx.constants
        ).total
        for n in owners
    }
    order = sorted(owners, key=lambda n: (-size[n], n))
    for tiers in ((0, 1), (2,)):
        for n in order:
            if rows[n]["helper"] is not None:
                continue
            ranked = _rank_helpers(by_id[n], helpers.values(), ctx, demands[n], centroids, tiers)
            if ranked:
                chosen = ranked[0]
                chosen.served[n] = demands[n]
                base = _split_reason(by_id[n], rows[n]["split"], ctx.shape.num_layers)
                rows[n].update(role=OWNER, helper=chosen.info.node_id)
                rows[n]["reason"] = f"{base}; {_helper_note(chosen, by_id[n], centroids)}"
                rows[n]["ranks"] = {**rows[n]["ranks"], **demands[n].ranks}
    for n in order:
        if rows[n]["helper"] is None:
            rows[n]["role"] = WAITING
            rows[n]["reason"] = (
                f"waiting: split {rows[n]['split']}/{ctx.shape.num_layers} needs a helper "
                f"with {format_bytes(size[n])} free; none has it"
            )
    return order


def _fallbacks(
    info: NodeInfo, row: dict, helpers: Mapping[str, _Helper], ctx: PlanContext, centroids
) -> tuple[str, ...]:
    demand = _demand(ctx, row["split"], row["ranks"])
    others = [h for h in helpers.values() if h.info.node_id != row["helper"]]
    ranked = _rank_helpers(info, others, ctx, demand, centroids, (0, 1, 2))
    return tuple(h.info.node_id for h in ranked[: ctx.config.max_fallbacks])


def _assemble(
    rows: dict[str, dict], helpers: Mapping[str, _Helper], ctx: PlanContext, by_id: Mapping[str, NodeInfo]
) -> Plan:
    nodes = {}
    for node_id in sorted(rows):
        row = rows[node_id]
        serves = tuple(sorted(helpers[node_id].served)) if node_id in helpers else ()
        reason = row["reason"]
        if serves:
            h = helpers[node_id]
            reason += f"; serves {', '.join(serves)} ({format_bytes(h.used(ctx))} of {format_bytes(h.capacity)})"
        elif row["role"] == HELPER:
            reason += (
                "; idle" if by_id[node_id].may_host else "; idle: may not host other owners (--hosts, or unreachable)"
            )
        nodes[node_id] = NodePlan(
            node_id,
            row["cluster"],
            row["role"],
            row["split"],
            dict(sorted(row["ranks"].items())),
            row["helper"],
            tuple(row["fallbacks"]),
            serves,
            reason,
        )
    return Plan(nodes, ctx, dict(by_id))


def _index(infos: Iterable[NodeInfo]) -> dict[str, NodeInfo]:
    by_id: dict[str, NodeInfo] = {}
    for info in infos:
        if not isinstance(info, NodeInfo):
            raise ValueError(f"infos: expected NodeInfo, got {type(info).__name__}")
        if info.node_id in by_id:
            raise ValueError(f"node_id={info.node_id!r}: given twice")
        by_id[info.node_id] = info
    return by_id


# ------------------------------------------------------------------ repair and re-planning


def repair(
    plan: Plan,
    dead_node_ids: Iterable[str],
    infos: Sequence[NodeInfo],
    centroids: Mapping[int, Sequence[float]] | None = None,
    avoid: Iterable[str] = (),
    unpair: Mapping[str, str] | None = None,
) -> Plan:
    """A new plan without the dead nodes that changes as little as possible.

    Only owners whose helper died get a new helper (same cluster first, then unclustered
    pure helpers, then the nearest cluster), keeping their split and ranks; with none
    feasible they wait. Everyone else keeps their row; dead ids leave every fallback
    and serves list. `infos`: the live nodes' current records (for their budgets).
    `avoid`: helpers handed out only when no other fits (nodes silent right now, likely
    dead with the one being replaced); they keep serving whom they serve.
    `unpair`: {owner: helper} pairs that failed while the helper lives on: the owner gets
    another helper (never that one) as if its helper had died; the helper keeps its other
    owners. A pair the plan no longer holds is ignored.
    """
    dead, avoided = set(dead_node_ids), set(avoid)
    unknown = dead - set(plan.nodes)
    if unknown:
        raise ValueError(f"dead_node_ids: {sorted(unknown)} are not in the plan")
    unpair = {o: h for o, h in (unpair or {}).items() if o in plan.nodes and plan.nodes[o].helper == h}
    by_id = {i.node_id: i for i in _index(infos).values() if i.node_id not in dead}
    missing = set(plan.nodes) - dead - set(by_id)
    if missing:
        raise ValueError(f"infos: no record for live nodes {sorted(missing)}")
    ctx = plan.context
    rows = _rows_of(plan, dead)
    helpers = _serving(plan, by_id, rows, dead)
    for owner, helper in unpair.items():
        if helper in helpers:
            del helpers[helper].served[owner]
    orphans = [n for n in rows if rows[n]["role"] == OWNER and (rows[n]["helper"] in dead or n in unpair)]
    # owners already waiting for a helper are tried again: a repair runs when an owner finishes
    # or moves, which is when room frees up, and nothing else would ever pair them
    orphans += [n for n in rows if rows[n]["role"] == WAITING and rows[n]["split"] is not None and n not in dead]
    demands = {n: _owner_demand(ctx, rows[n]) for n in orphans}
    size = {
        n: helper_footprint(
            ctx.shape, [demands[n]], weight_bytes=ctx.workload.weight_bytes, constants=ctx.constants
        ).total
        for n in orphans
    }
    for n in sorted(orphans, key=lambda n: (-size[n], n)):
        lost = rows[n]["helper"]
        demand = demands[n]
        others = [h for h in helpers.values() if h.info.node_id != unpair.get(n)]
        ranked = sorted(
            _rank_helpers(by_id[n], others, ctx, demand, centroids, (0, 1, 2)),
            key=lambda h: h.info.node_id in avoided,  # stable: the planner's order within each group
        )
        base = _split_reason(by_id[n], rows[n]["split"], ctx.shape.num_layers)
        if ranked:
            chosen = ranked[0]
            chosen.served[n] = demand
            replaces = "" if lost is None else f" (replaces {lost})"
            rows[n].update(role=OWNER, helper=chosen.info.node_id, ranks={**rows[n]["ranks"], **demand.ranks})
            rows[n]["reason"] = f"{base}; {_helper_note(chosen, by_id[n], centroids)}{replaces}"
        elif lost is not None:
            rows[n].update(
                role=WAITING, helper=None, reason=f"waiting: helper {lost} left; none has {format_bytes(size[n])} free"
            )
    for n in orphans:
        if rows[n]["role"] == OWNER:
            rows[n]["fallbacks"] = _fallbacks(by_id[n], rows[n], helpers, ctx, centroids)
        else:
            rows[n]["fallbacks"] = ()
    for n, h in helpers.items():  # _assemble adds the serves part again
        rows[n]["reason"] = _serving_reason(rows[n]["role"], h.info, ctx.shape.num_layers)
    return _keep_unchanged(plan, _assemble(rows, helpers, ctx, {n: by_id[n] for n in rows}))


def _owner_demand(ctx: PlanContext, row: dict) -> ServedOwner:
    """What hosting this owner's tail takes: its tail ranks, or the minimum ones when it never
    had a helper (a row make_plan left waiting holds its own side's ranks only)."""
    demand = _demand(ctx, row["split"], row["ranks"])
    if demand.ranks:
        return demand
    return _demand(ctx, row["split"], {**row["ranks"], **_tail_floor(ctx, row["split"], {})})


def _rows_of(plan: Plan, dead: set[str]) -> dict[str, dict]:
    """The plan's rows as the planner's mutable dicts, without `dead` (also out of fallbacks)."""
    return {
        n: dict(
            cluster=p.cluster,
            role=p.role,
            split=p.split,
            ranks=dict(p.ranks),
            helper=p.helper,
            fallbacks=tuple(f for f in p.fallbacks if f not in dead),
            reason=p.reason,
        )
        for n, p in plan.nodes.items()
        if n not in dead
    }


def _serving(plan: Plan, by_id: Mapping[str, NodeInfo], rows: Mapping[str, dict], dead: set[str]) -> dict[str, _Helper]:
    """The plan's hosts (whole-model nodes and pure helpers that may host) with what they serve, without `dead`."""
    ctx = plan.context
    helpers: dict[str, _Helper] = {}
    for n, p in plan.nodes.items():
        if n in dead or p.role not in (WHOLE, HELPER) or not by_id[n].may_host:
            continue
        own = (
            whole_model_footprint(ctx.shape, p.ranks, ctx.workload, ctx.constants)
            if p.role == WHOLE
            else Footprint(0, 0, 0)
        )
        h = _Helper(by_id[n], _budget(by_id[n], ctx.config), own, p.role == WHOLE)
        for o in p.serves:
            if o not in dead:
                h.served[o] = _demand(ctx, rows[o]["split"], rows[o]["ranks"])
        helpers[n] = h
    return helpers


def _keep_unchanged(plan: Plan, new: Plan) -> Plan:
    """`new` with every row equal to the old one (apart from the reason) kept as it was."""
    keep = {
        n: (plan.nodes[n] if n in plan.nodes and rows_equal(plan.nodes[n], new.nodes[n]) else new.nodes[n])
        for n in new.nodes
    }
    return Plan(keep, new.context, new.infos)


def admit(
    plan: Plan,
    infos: Sequence[NodeInfo],
    importance: Mapping[int, Mapping[str, float]] | None = None,
    centroids: Mapping[int, Sequence[float]] | None = None,
) -> Plan:
    """A plan with the nodes of `infos` it does not hold yet (joined, back, or just clustered)
    added, changing as little as possible: every planned row stays as it is.

    A newcomer gets the role, split and ranks `make_plan` would give it alone; a new owner is
    paired (first-fit decreasing, own cluster and pure helpers first) with the spare memory
    of the hosts already planned and of the new ones, with minimum ranks on its helper's
    side (the plan's one rank, when it fixes one) unless that helper is new; a host that is
    new serves nobody until then. Owners waiting for a helper are tried again the same way.
    `infos` must hold every planned node. A full `make_plan` places everyone afresh; this keeps a large swarm's running pairs
    (and their rounds) when one node comes back.
    """
    by_id = _index(infos)
    missing = set(plan.nodes) - set(by_id)
    if missing:
        raise ValueError(f"infos: no record for planned nodes {sorted(missing)} (take them out with repair)")
    ctx, cfg = plan.context, plan.context.config
    rows = _rows_of(plan, set())
    helpers = _serving(plan, by_id, rows, set())
    new = sorted(set(by_id) - set(plan.nodes))
    fresh: set[str] = set()
    for node_id in new:
        info = by_id[node_id]
        role, split, ranks, reason, own = _solo(info, ctx, _importance_for(importance, info.cluster))
        rows[node_id] = dict(
            cluster=info.cluster, role=role, split=split, ranks=ranks, helper=None, fallbacks=(), reason=reason
        )
        if role in (WHOLE, HELPER) and info.may_host:
            helpers[node_id] = _Helper(info, _budget(info, cfg), own or Footprint(0, 0, 0), role == WHOLE)
            fresh.add(node_id)
    unpaired = [n for n in new if rows[n]["role"] == OWNER]
    unpaired += [n for n in sorted(plan.nodes) if rows[n]["role"] == WAITING and rows[n]["split"] is not None]
    order = _pair(unpaired, rows, helpers, by_id, ctx, importance, centroids)
    for h in sorted(helpers.values(), key=lambda h: h.info.node_id):
        if h.info.node_id in fresh:
            _fill_helper_ranks(h, ctx, rows, importance)
    for n in order:
        if rows[n]["role"] == OWNER:
            rows[n]["fallbacks"] = _fallbacks(by_id[n], rows[n], helpers, ctx, centroids)
    for n, h in helpers.items():  # _assemble adds the serves part again
        if h.served or n in fresh:
            rows[n]["reason"] = _serving_reason(rows[n]["role"], h.info, ctx.shape.num_layers)
    return _keep_unchanged(plan, _assemble(rows, helpers, ctx, by_id))


def rows_equal(a: NodePlan, b: NodePlan) -> bool:
    """Same row apart from the free-text reason."""
    return replace(a, reason="") == replace(b, reason="")


def replan_reason(
    old: Sequence[NodeInfo],
    new: Sequence[NodeInfo],
    importance_moved: float,
    *,
    tau: float = TAU,
    budget_tolerance: float = 0.1,
) -> str | None:
    """Why a full re-plan is due, or None: membership, cluster or leave to host changed, a memory
    budget or bandwidth moved by more than `budget_tolerance` (relative), or the
    importance moved by more than τ in L1 (`importance_moved`, see
    importance.importance_change)."""
    if tau < 0 or budget_tolerance < 0:
        raise ValueError(f"tau={tau!r}, budget_tolerance={budget_tolerance!r}: must be >= 0")
    a, b = _index(old), _index(new)
    if set(a) != set(b):
        joined, left = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        return f"membership changed (joined {joined}, left {left})"
    for n in sorted(a):
        x, y = a[n], b[n]
        if x.cluster != y.cluster or x.caps.has_data != y.caps.has_data:
            return f"node {n} changed cluster or role"
        if x.may_host != y.may_host:  # e.g. the bootstrap could not dial it back: it must stop serving
            return f"node {n} {'may now' if y.may_host else 'may no longer'} host other owners"
        if abs(y.caps.memory_bytes - x.caps.memory_bytes) > budget_tolerance * x.caps.memory_bytes:
            return f"node {n} memory budget changed"
        if abs(y.caps.bandwidth_bps - x.caps.bandwidth_bps) > budget_tolerance * x.caps.bandwidth_bps:
            return f"node {n} bandwidth changed"
    if importance_moved > tau:
        return f"importance moved {importance_moved:.3f} > {tau}"
    return None


__all__ = [
    "HELPER",
    "OWNER",
    "RANK_SET",
    "WAITING",
    "WHOLE",
    "NodeInfo",
    "NodePlan",
    "Plan",
    "PlanConfig",
    "PlanContext",
    "admit",
    "fits_whole_model",
    "format_bps",
    "format_bytes",
    "make_plan",
    "minimum_ranks",
    "privacy_min_split",
    "repair",
    "replan_reason",
    "water_fill",
]
