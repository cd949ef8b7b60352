"""Where each model family keeps its parts: one torch-free table.

The memory model (atlas_p2p.memory) counts parameters and names LoRA candidates from it
without loading a model; the family adapters (atlas_p2p.models.families) add how a
block runs on top of the same rows. A new family is one row here and one adapter there.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas_p2p.vocabulary import SEQ_CLS, TASKS

LORA_KINDS = ("attn", "mlp")  # groups of LoRA-able linears in a block


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of one family, relative to the Hugging Face task model."""

    name: str  # "gpt2" | "llama" | "bert"
    model_types: tuple[str, ...]  # HF config model_type values that share this layout
    backbone_attr: str  # attribute of the task model that holds the backbone
    blocks_attr: str  # path of the block list inside the backbone
    final_norm_attr: str | None  # inside the backbone; None when the family has none
    attn_modules: tuple[str, ...]  # LoRA-able linears of the attention, relative to a block
    mlp_modules: tuple[str, ...]  # LoRA-able linears of the MLP, relative to a block
    tasks: tuple[str, ...] = TASKS  # heads the family supports
    conv1d: bool = False  # weights stored (in, out) (GPT-2 Conv1D): peft needs fan_in_fan_out
    learned_positions: bool = False  # a position table caps the sequence length at max_position_embeddings

    def blocks_path(self) -> str:
        """Dotted name of the block list inside the task model (e.g. ``model.layers``)."""
        return f"{self.backbone_attr}.{self.blocks_attr}"

    def lora_module_names(self, layer: int, kinds: tuple[str, ...] = LORA_KINDS) -> list[str]:
        """Full names (relative to the task model) of the LoRA-able linears of block `layer`,
        attention first, in the order of `kinds`."""
        names: list[str] = []
        for kind in kinds:
            subs = self.attn_modules if kind == "attn" else self.mlp_modules
            names += [f"{self.blocks_path()}.{layer}.{sub}" for sub in subs]
        return names


GPT2 = FamilyLayout(
    name="gpt2",
    model_types=("gpt2",),
    backbone_attr="transformer",
    blocks_attr="h",
    final_norm_attr="ln_f",
    attn_modules=("attn.c_attn", "attn.c_proj"),
    mlp_modules=("mlp.c_fc", "mlp.c_proj"),
    conv1d=True,
    learned_positions=True,
)
LLAMA = FamilyLayout(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    backbone_attr="model",
    blocks_attr="layers",
    final_norm_attr="norm",
    attn_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp_modules=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)
BERT = FamilyLayout(
    name="bert",
    model_types=("bert",),
    backbone_attr="bert",
    blocks_attr="encoder.layer",
    final_norm_attr=None,  # BERT normalises inside every block
    attn_modules=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    mlp_modules=("intermediate.dense", "output.dense"),
    tasks=(SEQ_CLS,),
    learned_positions=True,
)

LAYOUTS: dict[str, FamilyLayout] = {layout.name: layout for layout in (GPT2, LLAMA, BERT)}
# HF model_type -> the family whose layout it shares
MODEL_TYPES: dict[str, str] = {mt: layout.name for layout in LAYOUTS.values() for mt in layout.model_types}

__all__ = ["BERT", "GPT2", "LAYOUTS", "LLAMA", "LORA_KINDS", "MODEL_TYPES", "FamilyLayout"]
