"""Memory model vs measured peak memory of a split training step (DESIGN 7).

For each family, real Hugging Face models built from configs (no download): tiny ones
(6 blocks, H = 64, MLP ratio 2 and 4, dropout off and on) and a GPT-2-small-sized one
(12 blocks, H = 768, 12 heads, I = 3072, the family's usual vocabulary and dropout).
peft LoRA (rank 8 on every attention and MLP projection) is attached with
atlas_p2p.lora, the owner part comes from atlas_p2p.models.split_model, and one AdamW
step is measured by atlas_p2p.memory.measure_step (parameters + AdamW state counted
from the tensors, plus the peak of live CPU allocations during the step from the
torch profiler). Rows: owner parts at several split points and batch shapes, and the
whole model with its head.

Prints one row per measurement and `max_rel_error` of the memory model (the calibrated
constants in atlas_p2p.memory.FAMILY_CONSTANTS) against the measured peaks; target
<= 0.25. Also `heldout_max_rel_error`: constants re-fitted here on the tiny rows only,
scored on the GPT-2-small-sized rows. `--calibrate` prints the constants fitted on the
tiny rows, in the form of the table in atlas_p2p/memory.py.

    python benchmarks/memory_model.py [--family gpt2|llama|bert|all] [--json PATH] [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p import memory  # noqa: E402
from atlas_p2p.lora import attach_lora, lora_targets  # noqa: E402
from atlas_p2p.models import split_model, unsplit_forward  # noqa: E402

log = logging.getLogger("benchmarks.memory_model")

RANK = 8
TINY = dict(layers=6, hidden=64, heads=4, vocab=1000)
TINY_SPLITS = (1, 3, 5)
TINY_BATCHES = ((2, 32), (4, 64), (2, 128))
SMALL_SPLITS = (2, 6, 11)
SMALL_BATCHES = ((2, 64), (4, 128))
SMALL_VOCAB = {"gpt2": 50257, "llama": 32000, "bert": 30522}
SMALL_DROPOUT = {"gpt2": True, "llama": False, "bert": True}  # as the public checkpoints ship


def build(family: str, *, layers: int, hidden: int, heads: int, vocab: int, mlp: int, dropout: bool):
    """A randomly initialised HF model of `family` from a config (seeded, offline)."""
    import transformers as T

    p = 0.1 if dropout else 0.0
    torch.manual_seed(0)
    if family == "gpt2":
        config = T.GPT2Config(
            n_layer=layers,
            n_embd=hidden,
            n_head=heads,
            n_inner=mlp * hidden,
            vocab_size=vocab,
            n_positions=512,
            resid_pdrop=p,
            embd_pdrop=p,
            attn_pdrop=p,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = T.GPT2LMHeadModel(config)
    elif family == "llama":
        config = T.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            intermediate_size=mlp * hidden,
            vocab_size=vocab,
            max_position_embeddings=512,
            attention_dropout=p,
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = T.LlamaForCausalLM(config)
    else:
        config = T.BertConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=mlp * hidden,
            vocab_size=vocab,
            max_position_embeddings=512,
            hidden_dropout_prob=p,
            attention_probs_dropout_prob=p,
            num_labels=2,
            pad_token_id=0,
        )
        model = T.BertForSequenceClassification(config)
    task = "seq_cls" if family == "bert" else "causal_lm"
    shape = memory.shape_from_config(model.config, task)
    ranks = {name: RANK for name in lora_targets(model, kinds=("attn", "mlp"))}
    peft_model = attach_lora(model, ranks)
    peft_model.train()
    return peft_model, shape, ranks


def batch(shape: memory.ModelShape, B: int, S: int):
    """Random ids, every other row right-padded over its last quarter."""
    g = torch.Generator().manual_seed(B * 1000 + S)
    ids = torch.randint(3, shape.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[::2, S - S // 4 :] = 0
    labels = torch.randint(0, 2, (B,), generator=g) if shape.task == "seq_cls" else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def measure(model, shape, ranks, split: int | None, B: int, S: int) -> memory.MemorySample:
    """One measured sample: owner part at `split`, or the whole model when split is None."""
    ids, mask, labels = batch(shape, B, S)
    if split is None:
        part, run = model, lambda: unsplit_forward(model, ids, mask, labels)[0]
        split, head = shape.num_layers, True
    else:
        part, _ = split_model(model, split)
        run, head = (lambda: part(ids, mask)), False
    m = memory.measure_step(part, run)
    return memory.MemorySample(shape, split, ranks, memory.Workload(B, S), m.peak, head=head)


def tiny_samples(family: str, dropout: bool) -> list[memory.MemorySample]:
    out = []
    for mlp in (2, 4):
        model, shape, ranks = build(family, mlp=mlp, dropout=dropout, **TINY)
        for split in TINY_SPLITS:
            for B, S in TINY_BATCHES:
                out.append(measure(model, shape, ranks, split, B, S))
        for B, S in TINY_BATCHES[:2]:
            out.append(measure(model, shape, ranks, None, B, S))
    return out


def small_samples(family: str) -> list[memory.MemorySample]:
    model, shape, ranks = build(
        family, layers=12, hidden=768, heads=12, vocab=SMALL_VOCAB[family], mlp=4, dropout=SMALL_DROPOUT[family]
    )
    out = [measure(model, shape, ranks, split, B, S) for split in SMALL_SPLITS for B, S in SMALL_BATCHES]
    out.append(measure(model, shape, ranks, None, *SMALL_BATCHES[0]))
    return out


def row(sample: memory.MemorySample, config: str, constants=None) -> dict:
    predicted = memory.predict(sample, constants)
    known = memory.predict(sample, memory.ActivationConstants(0.0, 0.0, 0.0))
    return {
        "family": sample.shape.family,
        "config": config,
        "dropout": sample.shape.dropout,
        "part": "whole" if sample.head else "owner",
        "split": sample.split,
        "batch": sample.workload.batch,
        "seq_len": sample.workload.seq_len,
        "measured_bytes": sample.peak,
        "predicted_bytes": predicted,
        "rel_error": abs(predicted - sample.peak) / sample.peak,
        "activation_rel_error": abs((predicted - known) - (sample.peak - known)) / max(sample.peak - known, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=(*memory.FAMILIES, "all"), default="all")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--calibrate", action="store_true", help="print constants fitted on the tiny rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    families = memory.FAMILIES if args.family == "all" else (args.family,)
    started = time.perf_counter()
    rows, fitted, heldout = [], {}, []
    print(
        f"{'family':6} {'config':7} {'drop':4} {'part':5} {'split':>5} {'B':>2} {'S':>4} "
        f"{'measured MB':>12} {'predicted MB':>12} {'rel err':>8} {'act err':>8}"
    )
    for family in families:
        tiny = {d: tiny_samples(family, d) for d in (False, True)}
        small = small_samples(family)
        for d, samples in tiny.items():
            fitted[f"{family},{d}"] = memory.calibrate(family, samples)
        refit = fitted[f"{family},{SMALL_DROPOUT[family]}"]
        heldout += memory.relative_errors(small, refit)
        for config, samples in (("tiny", tiny[False] + tiny[True]), ("small", small)):
            for s in samples:
                r = row(s, config)
                rows.append(r)
                print(
                    f"{r['family']:6} {config:7} {str(r['dropout'])[0]:4} {r['part']:5} {r['split']:>5} "
                    f"{r['batch']:>2} {r['seq_len']:>4} {r['measured_bytes'] / 1e6:>12.2f} "
                    f"{r['predicted_bytes'] / 1e6:>12.2f} {r['rel_error']:>8.3f} {r['activation_rel_error']:>8.3f}"
                )
    result = {
        "max_rel_error": max(r["rel_error"] for r in rows),
        "max_activation_rel_error": max(r["activation_rel_error"] for r in rows),
        "heldout_max_rel_error": max(heldout),
        "target": 0.25,
        "rows": rows,
        "fitted_on_tiny": {k: vars(c) for k, c in fitted.items()},
        "seconds": time.perf_counter() - started,
    }
    print(f"max_rel_error {result['max_rel_error']:.4f} (target <= 0.25)")
    print(f"max_activation_rel_error {result['max_activation_rel_error']:.4f}")
    print(f"heldout_max_rel_error {result['heldout_max_rel_error']:.4f} (fit on tiny, scored on GPT-2-small-sized)")
    print(f"seconds {result['seconds']:.1f}")
    if args.calibrate:
        for key, c in fitted.items():
            family, d = key.split(",")
            print(
                f'    ("{family}", {d}): ActivationConstants(per_hidden={c.per_hidden:.3f}, '
                f"per_mlp={c.per_mlp:.3f}, per_score={c.per_score:.3f}, fixed={c.fixed:.3f}, "
                f"head={c.head:.3f}),"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["max_rel_error"] <= result["target"] else 1


if __name__ == "__main__":
    sys.exit(main())
