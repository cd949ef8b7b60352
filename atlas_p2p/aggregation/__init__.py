"""Aggregation of LoRA updates (DESIGN section 8 and the baselines of section 9).

- ``factors``: contributions (factors, scalings, sample counts) and their validation.
- ``stacking``: the exact stacked merge, patches, apply / fold, byte counts.
- ``reduce``: the same merge as partial sums combined up a tree (stacked or full per module).
- ``refactor``: the optional lossy truncated-SVD re-factoring and its error.
- ``digest`` / ``arrays``: content digests and the flat-array form of a patch.
- ``baselines``: SplitLoRA's factor-wise FedAvg and MIRA's task-graph step.
All functions are pure and synchronous: tensors in, tensors out.
"""

from .arrays import patch_from_arrays, patch_to_arrays
from .baselines import (
    MIRA_PULL,
    FactorAverage,
    cluster_adjacency,
    common_rank,
    cosine_adjacency,
    fedavg_factors,
    fedavg_partial,
    mira_mixing_matrix,
    mira_personal_patch,
    mira_update,
)
from .digest import DigestMismatchError, digest_entries
from .factors import AdapterFactors, Contribution, as_factors, concat_factors
from .reduce import Partial, ReduceTree, combine, finalize, partial_of
from .refactor import (
    LowRank,
    numerical_rank,
    rank_within,
    refactor_lossy,
    refactor_within,
    stacked_singular_values,
)
from .stacking import (
    Patch,
    StackedFactors,
    apply_patch,
    average_dense,
    dense_delta,
    dense_nbytes,
    fold_patches,
    patch_nbytes,
    sample_weights,
    stack_merge,
    stacked_is_smaller,
)

__all__ = [
    "AdapterFactors",
    "Contribution",
    "DigestMismatchError",
    "FactorAverage",
    "LowRank",
    "Partial",
    "Patch",
    "ReduceTree",
    "StackedFactors",
    "apply_patch",
    "as_factors",
    "average_dense",
    "cluster_adjacency",
    "combine",
    "common_rank",
    "concat_factors",
    "cosine_adjacency",
    "dense_delta",
    "dense_nbytes",
    "digest_entries",
    "fedavg_factors",
    "fedavg_partial",
    "finalize",
    "fold_patches",
    "MIRA_PULL",
    "mira_mixing_matrix",
    "mira_personal_patch",
    "mira_update",
    "numerical_rank",
    "partial_of",
    "patch_from_arrays",
    "patch_nbytes",
    "patch_to_arrays",
    "rank_within",
    "refactor_lossy",
    "refactor_within",
    "sample_weights",
    "stack_merge",
    "stacked_is_smaller",
    "stacked_singular_values",
]
