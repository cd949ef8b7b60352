"""Split training as pure synchronous torch code: the node runtime calls it.

- ``seeds``: reproducible round and step seeds.
- ``owner``: :class:`OwnerSession`, embeddings + blocks[:s] with the owner's LoRA.
- ``helper``: :class:`HelperSession`, blocks[s:] + head with one server-side adapter per owner;
  :class:`HelperPool`, one replica per cluster served.
- ``carry``: a contribution that missed its manifest joins the next one, exactly.
- ``fold``: add a merged patch to a node's base weights under its version log.
- ``export``: a cluster's total update as a standard PEFT adapter directory.
- ``evaluate``: held-out accuracy or perplexity of a node's model.
- ``fingerprinting``: a node's fingerprint on its data, whole or across a cut.
- ``errors``: typed errors the runtime maps to ``error(replay)`` / ``error(version)``.
No sockets, no asyncio: tensors in, tensors out.
"""

from .carry import carry_over
from .errors import (
    ReplayNeeded,
    RoundMismatchError,
    SessionStateError,
    StepOrderError,
    UnknownOwnerError,
    VersionMismatchError,
)
from .evaluate import eval_batches, evaluate
from .export import (
    EXPORT_CHECK_ROWS,
    EXPORT_FORMAT,
    AdapterCard,
    ExportCheck,
    ExportReport,
    FactorMemo,
    ModuleExport,
    RoundEval,
    compare_predictions,
    export_adapter,
    render_card,
    total_update,
)
from .fingerprinting import CutHelper, cut_loss, node_fingerprint, whole_model_loss
from .fold import apply_to_model, check_patch, fold_into
from .helper import HelperConfig, HelperPool, HelperSession, ServerAdapter, StepResult
from .owner import OwnerConfig, OwnerForward, OwnerSession
from .seeds import round_seed, step_seed

__all__ = [
    "EXPORT_CHECK_ROWS",
    "EXPORT_FORMAT",
    "AdapterCard",
    "CutHelper",
    "ExportCheck",
    "ExportReport",
    "FactorMemo",
    "HelperConfig",
    "HelperPool",
    "HelperSession",
    "ModuleExport",
    "OwnerConfig",
    "OwnerForward",
    "OwnerSession",
    "ReplayNeeded",
    "RoundEval",
    "RoundMismatchError",
    "ServerAdapter",
    "SessionStateError",
    "StepOrderError",
    "StepResult",
    "UnknownOwnerError",
    "VersionMismatchError",
    "apply_to_model",
    "carry_over",
    "check_patch",
    "compare_predictions",
    "cut_loss",
    "eval_batches",
    "evaluate",
    "export_adapter",
    "fold_into",
    "node_fingerprint",
    "render_card",
    "round_seed",
    "step_seed",
    "total_update",
    "whole_model_loss",
]
