"""Models: loading, family adapters, splitting and losses (see DESIGN section 4)."""

from atlas_p2p.models.base import base_digest, mismatch_message, seeded_init_, tensor_seed
from atlas_p2p.models.families import (
    FAMILIES,
    BlockContext,
    Family,
    family_of,
    lora_module_names,
    num_layers,
    pool_last_token,
    positions_from_mask,
    task_of,
    unwrap,
)
from atlas_p2p.models.loading import (
    TINY_FAMILIES,
    ModelLoadError,
    UnsupportedModelError,
    load_config,
    load_model,
    load_tokenizer,
    model_revision,
    save_base,
    tiny_model,
)
from atlas_p2p.models.losses import (
    IGNORE_INDEX,
    causal_lm_labels,
    causal_lm_loss,
    classification_loss,
    task_loss,
)
from atlas_p2p.models.split import (
    HelperPart,
    MiddlePart,
    OwnerPart,
    UShapeHead,
    split_model,
    unsplit_forward,
)
from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS, SPLIT_MODES, TASKS

__all__ = [
    "CAUSAL_LM", "FAMILIES", "IGNORE_INDEX", "SEQ_CLS", "SPLIT_MODES", "TASKS", "TINY_FAMILIES",
    "BlockContext", "Family", "HelperPart", "MiddlePart", "ModelLoadError", "OwnerPart", "UShapeHead",
    "causal_lm_labels", "causal_lm_loss", "classification_loss", "family_of", "load_model", "load_tokenizer",
    "lora_module_names", "num_layers", "pool_last_token", "positions_from_mask", "save_base", "split_model",
    "task_loss", "task_of", "tiny_model", "unsplit_forward",
    "UnsupportedModelError", "base_digest", "load_config", "mismatch_message", "model_revision", "seeded_init_",
    "tensor_seed",
]
