"""The bootstrap's coordinator built from the swarm's spec (model shape and workload)."""

from __future__ import annotations

from atlas_p2p.vocabulary import U_SHAPE
from nodes.config import SwarmSpec
from nodes.coordinator import Coordinator, CoordinatorConfig


def make_coordinator(spec: SwarmSpec) -> Coordinator:
    """A Coordinator planning for `spec.model` at batch x seq_len (no weights are loaded for HF names)."""
    from atlas_p2p.memory import Workload, shape_from_config
    from atlas_p2p.planning import PlanConfig
    from nodes.modelname import model_config

    config = model_config(spec.model, spec.task, spec.num_labels)
    shape = shape_from_config(config, spec.task, spec.num_labels)
    return Coordinator(
        CoordinatorConfig(
            shape=shape,
            workload=Workload(spec.batch_size, spec.max_seq_len),
            plan=PlanConfig(
                u_shape=spec.split_mode == U_SHAPE, fixed_split=spec.fixed_split, uniform_rank=spec.uniform_rank
            ),
            min_nodes=spec.min_nodes,
            assign_after_s=spec.assign_after_s,
            clusters=spec.clusters,
            privacy_floor=spec.privacy_floor,
        )
    )
