"""Loading models and tokenizers by name or path, and building tiny models from configs.

``load_model`` reads any Hugging Face checkpoint (hub id already in the local cache, or a
directory) of a supported family with a causal-LM or a sequence-classification head.
Parameters the checkpoint lacks (a new head, a head of another size) are drawn from
``init_seed`` (atlas_p2p.models.base), so every process that loads the same checkpoint
with the same seed holds the same model. ``load_config`` reads only the config and checks
the family, which is all the bootstrap needs. ``tiny_model`` builds a small randomly
initialised model of a family from a config, never touching the network, and is
deterministic for a seed: tests, the demo and CI use it.

Every failure is a :class:`ModelLoadError` whose text is one line naming the model, what
went wrong and what to do (no traceback text from the libraries underneath).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from atlas_p2p.models.base import fresh_names, seeded_init_
from atlas_p2p.models.families import FAMILIES, family_of, unwrap
from atlas_p2p.validation import is_int, require_int
from atlas_p2p.vocabulary import CAUSAL_LM, SEQ_CLS, TASKS

logger = logging.getLogger(__name__)

TINY_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # special ids of tiny models
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded (not found offline, bad files, unsupported)."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """The checkpoint loads, but its family or task is not one ATLAS can split and train."""


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; ``/x``, ``./x``, ``~/x`` or ``a/b/c`` are paths."""
    return (
        name.startswith((os.sep, ".", "~"))
        or (os.altsep is not None and os.altsep in name)
        or name.count("/") > 1
        or Path(name).is_dir()
    )


def _check_path_like(name: str, what: str, need_config: bool = True) -> None:
    """A name written as a filesystem path must be a checkpoint directory."""
    if not _looks_like_path(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"cannot load {what} {name!r}: no such directory; pass an existing checkpoint "
            "directory (written by save_pretrained) or a hub id"
        )
    if need_config and what == "model" and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"cannot load {what} {name!r}: the directory has no config.json; pass a checkpoint "
            "directory written by save_pretrained (config.json and weights)"
        )


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens (True when a proxy is configured:
    the proxy decides). Lets a machine without network fail in a second instead of
    retrying for half a minute."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except (ImportError, AttributeError, ValueError):
        return True
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    if not host:
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub():
    """Silence the hub client's retry warnings while we try: the outcome is reported as one line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _explain(name: str, what: str, exc: BaseException, local_only: bool) -> str:
    """One line: which model, what went wrong, what to do."""
    text = " ".join(str(exc).split())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in WEIGHT_FILES) and what == "model":
            return (
                f"cannot load model {name!r}: the directory has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                "pass a checkpoint directory written by save_pretrained"
            )
        if "model_type" in text or "Unrecognized" in text:
            return (
                f"cannot load {what} {name!r}: its config.json names no model type this transformers "
                "version knows; pass a checkpoint of a supported family (gpt2, llama/mistral/qwen2, bert)"
            )
        return f"cannot load {what} {name!r}: {text[:300]}; check the files of the checkpoint directory"
    if local_only:
        why = (
            "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
            if _offline(None)
            else "the hub is not reachable from this machine"
        )
        return (
            f"cannot load {what} {name!r}: it is not a local directory and not in the Hugging Face cache, "
            f"and {why}; download it where the hub is reachable (huggingface-cli download {name}) "
            "or pass the path of a local checkpoint directory"
        )
    return (
        f"cannot load {what} {name!r} from the Hugging Face hub: {text[:300]}; check the id, or pass the "
        "path of a local checkpoint directory"
    )


def _from_pretrained(load, name: str, what: str, offline: bool | None, need_config: bool = True, **kwargs):
    """``load(name, local_files_only=..., **kwargs)``: local files first, then the hub if allowed.

    A hub id already in the cache never touches the network; one that is not is fetched
    only when not offline and the hub answers. Library errors become one-line
    ModelLoadErrors (``_explain``).
    """
    _check_path_like(name, what, need_config)
    local_only = _offline(offline)
    try:
        return load(name, local_files_only=True, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        if local_only or _looks_like_path(name) or not _hub_reachable():
            raise ModelLoadError(_explain(name, what, exc, local_only=True)) from exc
    try:
        with _quiet_hub():
            return load(name, local_files_only=False, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise ModelLoadError(_explain(name, what, exc, local_only=False)) from exc


def _check_task(task: str, num_labels: int | None) -> None:
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {TASKS}")
    if num_labels is not None and (not is_int(num_labels) or num_labels < 1):
        raise ValueError(f"num_labels: {num_labels!r} must be a positive int")
    if task == CAUSAL_LM and num_labels is not None:
        raise ValueError(f"num_labels: {num_labels!r} is only meaningful for task 'seq_cls'")


def check_supported(name: str, config, task: str | None = None) -> None:
    """Raise UnsupportedModelError unless ``config``'s family is one ATLAS knows (and runs ``task``)."""
    model_type = getattr(config, "model_type", None)
    families = [f for f in FAMILIES.values() if model_type in f.model_types]
    if not families:
        known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"model {name!r} is a {model_type!r} checkpoint, a family ATLAS cannot split; "
            f"pick a checkpoint of one of: {known}"
        )
    family = families[0]
    if task is not None and task not in family.tasks:
        raise UnsupportedModelError(
            f"model {name!r} ({family.name} family) does not support task {task!r}; use --task "
            f"{' or '.join(family.tasks)}"
        )


def gguf_parts(name: str) -> tuple[str, str | None]:
    """(directory or hub id, file) of a name that ends in ``.gguf``, else (name, None).

    A GGUF checkpoint is one file; transformers loads it from its folder (or hub repo) with
    ``gguf_file=`` and dequantises it. ``path/to/SmolLM2-135M-Instruct.Q4_1.gguf`` and
    ``owner/repo/file.gguf`` both work as a model name everywhere a name is taken.
    """
    if not name.lower().endswith(".gguf"):
        return name, None
    folder, _, file = name.replace(os.sep, "/").rpartition("/")
    return folder or ".", file


def _gguf_kwargs(name: str, what: str) -> tuple[str, dict]:
    """(what to load from, extra kwargs) for ``name``; a GGUF path that is not a file is refused."""
    folder, gguf = gguf_parts(name)
    if gguf is None:
        return name, {}
    if _looks_like_path(name) and not Path(name).expanduser().is_file():
        raise ModelLoadError(f"cannot load {what} {name!r}: no such GGUF file")
    return folder, {"gguf_file": gguf}


def load_config(name_or_path: str | os.PathLike, task: str | None = None, offline: bool | None = None):
    """The Hugging Face config of a checkpoint, checked to be of a supported family (and task).

    Reads config.json only (no weights): what the bootstrap plans with, and what a node
    checks before joining.
    """
    from transformers import AutoConfig

    name = os.fspath(name_or_path)
    folder, extra = _gguf_kwargs(name, "model")
    config = _from_pretrained(AutoConfig.from_pretrained, folder, "model", offline, need_config=not extra, **extra)
    check_supported(name, config, task)
    return config


def model_revision(name: str, config=None) -> str:
    """What names a checkpoint's version in the base digest: the config's commit hash
    (older transformers), else the commit of the cached hub snapshot, else the name itself."""
    commit = getattr(config, "_commit_hash", None) if config is not None else None
    if commit:
        return f"{name}@{commit}"
    if not _looks_like_path(name):
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            if isinstance(cached, str) and "snapshots" in Path(cached).parts:
                parts = Path(cached).parts
                return f"{name}@{parts[parts.index('snapshots') + 1]}"
    return name


def load_model(
    name_or_path: str | os.PathLike,
    task: str = CAUSAL_LM,
    num_labels: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    offline: bool | None = None,
    attn_implementation: str = "sdpa",
    init_seed: int = 0,
) -> nn.Module:
    """Load a checkpoint with a ``causal_lm`` or ``seq_cls`` head onto ``device``.

    ``offline`` None follows ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``; True never touches the
    network. Parameters the checkpoint does not hold (missing, or of another size, e.g. a
    head for another number of labels) are drawn from ``init_seed`` by
    ``atlas_p2p.models.base.seeded_init_``; their names are kept in the model's
    ``atlas_fresh_parameters`` attribute. Raises :class:`ModelLoadError` naming the model
    when it cannot be loaded (:class:`UnsupportedModelError`, also a ValueError, for a family
    or task ATLAS does not run). A decoder loaded for ``seq_cls`` without a pad id gets its
    EOS id as pad id (pooling itself uses the attention mask).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _check_task(task, num_labels)
    name = os.fspath(name_or_path)
    if gguf_file is None:
        load_config(name, task, offline)  # family and task checked before any weight is read
        name, gguf_file = _gguf_kwargs(name, "model")[0], gguf_parts(name)[1]
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,  # e.g. a 2-label head asked for 4 labels: drawn from init_seed below
    }
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if task == SEQ_CLS and num_labels is not None:
        kwargs["num_labels"] = num_labels
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification

    def load(n, local_files_only, **kw):
        # transformers would look for an adapter online unless told otherwise
        return auto.from_pretrained(
            n, local_files_only=local_files_only, adapter_kwargs={"local_files_only": local_files_only}, **kw
        )

    model, info = _from_pretrained(load, name, "model", offline, need_config=gguf_file is None, **kwargs)
    try:
        family = family_of(model)
    except ValueError as exc:
        raise UnsupportedModelError(f"model {name!r}: {exc}") from None
    if task not in family.tasks:
        raise UnsupportedModelError(
            f"model {name!r} ({family.name} family) does not support task {task!r}; "
            f"use --task {' or '.join(family.tasks)}"
        )
    fresh = fresh_names(info)
    applied = seeded_init_(model, fresh, init_seed)
    model.atlas_fresh_parameters = tuple(sorted(applied))
    if applied:
        logger.info(
            "%s: %d parameters not in the checkpoint drawn from init seed %d: %s",
            name,
            len(applied),
            init_seed,
            ", ".join(sorted(applied)),
        )
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
    folder, extra = _gguf_kwargs(name, "tokenizer")
    tok = _from_pretrained(AutoTokenizer.from_pretrained, folder, "tokenizer", offline, need_config=not extra, **extra)
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
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            **special,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD_ID,
        )
    kv_heads = heads // 2 if heads % 2 == 0 else heads  # grouped-query attention when possible
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        **special,
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
    for field, value, low in (
        ("vocab_size", vocab_size, 3),
        ("num_layers", num_layers, 1),
        ("hidden", hidden, 2),
        ("heads", heads, 1),
        ("max_positions", max_positions, 2),
    ):
        require_int(field, value, low)
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
