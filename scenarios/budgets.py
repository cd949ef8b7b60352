"""The churn scenarios' node budgets for a model other than the embedded one.

scenarios/churn.py sets its --memory budgets for the embedded tiny model: a strong node
that trains the whole model with room to serve one small owner, weak owners that fit two or
one block(s) and need a helper, pure helpers that serve several owners' later blocks. A
Hugging Face model needs other numbers for the same roles: its embeddings may outweigh its
blocks, so scaling the tiny budgets by one factor would leave a weak node unable to run a
single block. `fit_budgets` re-derives each role's budget from the planner's own footprints
(atlas_p2p.memory) at the scenario's batch and sequence length, divided by the planner's
headroom (atlas_p2p.planning.PlanConfig):

    strong = STRONG_TIMES x whole,  weak_i = WEAK_MARGIN x owner(blocks[:k_i]),  helper = HELPER_TIMES x whole

with whole = the whole model with the smallest adapters and owner(blocks[:k]) the first k
blocks with theirs; k_i = 2, 1, 2 as the tiny budgets give (capped at L - 1). The embedded
models keep churn's budgets unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from atlas_p2p.memory import (
    ServedOwner,
    Workload,
    helper_footprint,
    lora_candidates,
    owner_footprint,
    shape_from_config,
    whole_model_footprint,
)
from atlas_p2p.planning import PlanConfig, minimum_ranks
from nodes.config import EMBEDDED_MODELS
from nodes.modelname import model_config
from scenarios.churn import HELPER_MEMORY, STRONG_MEMORY, WEAK_MEMORIES, NodeSpec

STRONG_TIMES = 2.0  # the tiny budgets: 12 MB for a 6 MB need
HELPER_TIMES = 4.0  # 24 MB for a 6 MB need
WEAK_MARGIN = 1.1  # just above the owner's need: it runs those blocks and no more
WEAK_BLOCKS = (2, 1, 2)  # blocks each of WEAK_MEMORIES runs on the tiny model


def role_budgets(model: str, task: str, num_labels: int | None, batch: int, seq_len: int) -> dict[str, int]:
    """{churn's budget string: bytes for `model`} for the strong, weak and helper roles (module doc)."""
    shape = shape_from_config(model_config(model, task, num_labels), task, num_labels)
    workload = Workload(batch=batch, seq_len=seq_len)
    ranks = minimum_ranks(lora_candidates(shape), {})
    headroom = PlanConfig().headroom
    whole = whole_model_footprint(shape, ranks, workload).total / headroom
    budgets = {STRONG_MEMORY: STRONG_TIMES * whole, HELPER_MEMORY: HELPER_TIMES * whole}
    for memory, blocks in zip(WEAK_MEMORIES, WEAK_BLOCKS):
        split = min(blocks, shape.num_layers - 1)
        budgets[memory] = WEAK_MARGIN * owner_footprint(shape, split, ranks, workload).total / headroom
    return {memory: int(round(value)) for memory, value in budgets.items()}


def server_budget(
    model: str, task: str, num_labels: int | None, batch: int, seq_len: int, split: int, rank: int, owners: int
) -> int:
    """Bytes of one helper with room for `owners` owners cut at `split` with `rank` on every
    later module (SplitLoRA's one server for all its clients), WEAK_MARGIN above the need."""
    shape = shape_from_config(model_config(model, task, num_labels), task, num_labels)
    tail = {m.name: rank for m in lora_candidates(shape) if m.block >= split}
    served = [ServedOwner(split, Workload(batch=batch, seq_len=seq_len), tail)] * owners
    need = helper_footprint(shape, served).total / PlanConfig().headroom
    return int(round(WEAK_MARGIN * need))


def fit_budgets(
    specs: Sequence[NodeSpec], model: str, task: str, num_labels: int | None, batch: int, seq_len: int
) -> list[NodeSpec]:
    """`specs` with each role's budget for `model` (unchanged for an embedded model)."""
    if model in EMBEDDED_MODELS:
        return list(specs)
    budgets = role_budgets(model, task, num_labels, batch, seq_len)
    return [dataclasses.replace(s, memory=f"{budgets[s.memory]}B") for s in specs]
