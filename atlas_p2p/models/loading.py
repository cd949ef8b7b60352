"""Loading models and tokenizers by name or path, and building tiny models from configs.

``load_model`` reads any Hugging Face checkpoint (hub id already in the local cache, or a
directory) of a supported family with a causal-LM or a sequence-classification head.
``tiny_model`` builds a small randomly initialised model of a family from a config, never
touching the network, and is deterministic for a seed: tests, the demo and CI use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from atlas_p2p.models.families import CAUSAL_LM, SEQ_CLS, TASKS, family_of, unwrap

logger = logging.getLogger(__name__)

TINY_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # special ids of tiny models


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded (not found offline, bad files, unsupported)."""


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _check_path_like(name: str, what: str) -> None:
    """A name written as a filesystem path must exist (a hub id is ``org/name``, never ``/x`` or ``./x``)."""
    looks_like_path = name.startswith((os.sep, ".", "~")) or (os.altsep is not None and os.altsep in name)
    if looks_like_path and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"cannot load {what} {name!r}: no such directory")


def _check_task(task: str, num_labels: int | None) -> None:
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {TASKS}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels: {num_labels!r} must be a positive int")
    if task == CAUSAL_LM and num_labels is not None:
        raise ValueError(f"num_labels: {num_labels!r} is only meaningful for task 'seq_cls'")


def load_model(
    name_or_path: str | os.PathLike,
    task: str = CAUSAL_LM,
    num_labels: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    offline: bool | None = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Load a checkpoint with a ``causal_lm`` or ``seq_cls`` head onto ``device``.

    ``offline`` None follows ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``; True never touches the
    network. Raises :class:`ModelLoadError` naming the model when it cannot be loaded, and
    ValueError for an unsupported family. A decoder loaded for ``seq_cls`` without a pad id
    gets its EOS id as pad id (pooling itself uses the attention mask).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_task(task, num_labels)
    name = os.fspath(name_or_path)
    _check_path_like(name, "model")
    local_only = _offline(offline)
    kwargs: dict = {
        "dtype": dtype,
        "local_files_only": local_only,
        "adapter_kwargs": {"local_files_only": local_only},  # transformers would look for an adapter online
        "attn_implementation": attn_implementation,
    }
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if task == SEQ_CLS and num_labels is not None:
        kwargs["num_labels"] = num_labels
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        where = "offline (local files only)" if kwargs["local_files_only"] else "locally or from the hub"
        raise ModelLoadError(
            f"cannot load model {name!r} for task {task!r} {where}: {str(exc).strip().rstrip('.')}. "
            "Pass a local checkpoint directory or a hub id present in the Hugging Face cache."
        ) from exc
    family = family_of(model)
    if task not in family.tasks:
        raise ValueError(f"task: {task!r} is not supported for family {family.name!r} (supported: {family.tasks})")
    if task == SEQ_CLS and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if model.config.eos_token_id is not None else PAD_ID
    logger.info("loaded %s (%s, %s) on %s", name, family.name, task, device)
    return model.to(device)


def load_tokenizer(name_or_path: str | os.PathLike, offline: bool | None = None, padding_side: str | None = None):
    """Load the tokenizer of a checkpoint; a tokenizer without pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side: {padding_side!r} must be 'left', 'right' or None")
    _check_path_like(name, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=_offline(offline))
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise ModelLoadError(f"cannot load tokenizer {name!r}: {str(exc).strip().rstrip('.')}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer {name!r} has neither a pad token nor an EOS token to pad with")
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


def _tiny_config(family: str, vocab_size: int, num_layers: int, hidden: int, heads: int, max_positions: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    special = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=num_layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, **special,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID,
        )
    kv_heads = heads // 2 if heads % 2 == 0 else heads  # grouped-query attention when possible
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, use_cache=False, **special,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    return MistralConfig(sliding_window=None, **common)


def tiny_model(
    family: str,
    task: str,
    vocab_size: int,
    num_labels: int | None = None,
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    seed: int = 0,
    max_positions: int = 256,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A small random model of ``family`` (gpt2, llama, qwen2, mistral, bert) built from a config.

    Same seed, same weights (the global RNG is left untouched). Dropout is 0, pad/bos/eos ids
    are 0/1/2. ``bert`` supports ``seq_cls`` only; ``seq_cls`` needs ``num_labels``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if family not in TINY_FAMILIES:
        raise ValueError(f"family: {family!r} is not one of {TINY_FAMILIES}")
    _check_task(task, num_labels)
    if task == SEQ_CLS and num_labels is None:
        raise ValueError("num_labels: required for task 'seq_cls'")
    if family == "bert" and task != SEQ_CLS:
        raise ValueError(f"task: {task!r} is not supported for family 'bert' (use 'seq_cls')")
    for field, value, low in (("vocab_size", vocab_size, 3), ("num_layers", num_layers, 1), ("hidden", hidden, 2),
                              ("heads", heads, 1), ("max_positions", max_positions, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{field}: {value!r} must be an int >= {low}")
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden: {hidden} must split into {heads} heads of even size")
    config = _tiny_config(family, vocab_size, num_layers, hidden, heads, max_positions)
    if task == SEQ_CLS:
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn_implementation)
    return model


def save_base(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """Write the base model (and tokenizer, when given) as a checkpoint ``load_model`` can read.

    For a peft-wrapped model the frozen base is written (with every delta folded by
    ``add_delta_to_base``); adapters and trainable head copies are left out — they go to the
    adapter directory (``save_peft_dir``).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf = unwrap(model)
    state = {}
    for key, value in hf.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[key] = value
    hf.save_pretrained(out, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
