"""Clustering quality of task fingerprints computed from real gradients.

Every client holds its own sample of one synthetic task; all clients share one seeded
tiny base model (built from a config, never downloaded). Each client computes its
fingerprint (rank-4 probe LoRA on block 0, m samples, 64-d seeded sketch), the
bootstrap's clustering picks K by silhouette (K is not given), and we score the
clusters against the true task ids with ARI and NMI. The same probe gradients are then
released through the Gaussian mechanism at several noise multipliers σ (clip C = the
median probe-gradient norm) and clustered again; (ε, δ) is reported per σ.

A second, one-task population (every client on task 0) checks that the clustering
says K = 1 when there is nothing to separate.

    python benchmarks/clustering.py [--json PATH] [--family gpt2|llama|bert]
        [--clients-per-task 5] [--tasks 4] [--kind classification|instruction|lm]

``--small-n`` instead measures the rate of correct K at the churn scenario's sizes:
populations 2 x 3, 2 x 4 and one-task controls of 6 and 20 clients, over --seeds (base
model, probe seed and every client's data change with the seed), with the bootstrap's
K rule (ClusteringConfig defaults) at m = --samples.

    python benchmarks/clustering.py --small-n --layers 4 --samples 64 --seeds 0 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.clustering import (  # noqa: E402
    ClusteringConfig,
    adjusted_rand,
    cluster_fingerprints,
    normalized_mutual_info,
)
from atlas_p2p.data import encode, records_from_dicts  # noqa: E402
from atlas_p2p.fingerprint import (  # noqa: E402
    FingerprintConfig,
    dp_epsilon,
    fingerprint_sample,
    privatize,
    probe_gradient,
    project,
)
from atlas_p2p.models import tiny_model  # noqa: E402
from atlas_p2p.synthetic import SyntheticConfig, SyntheticTasks, synthetic_tokenizer  # noqa: E402

logger = logging.getLogger("benchmarks.clustering")


def hf_loss(model, batch):
    """Mean loss of the Hugging Face model's own head on the batch."""
    return model(**batch).loss


def client_gradients(args, tasks_of_clients: list[int], model, tokenizer, generator) -> np.ndarray:
    """(clients, dim(g)) probe gradients, one client at a time, each with its own sample."""
    config = FingerprintConfig(seed=args.fingerprint_seed, num_samples=args.samples)
    grads = []
    for client, task in enumerate(tasks_of_clients):
        records = records_from_dicts(generator.generate(task, args.samples, args.kind, seed=10_000 + client))
        encoded = encode(records, tokenizer, max_len=args.max_len)
        grads.append(probe_gradient(model, fingerprint_sample(encoded, config), hf_loss, config))
    return np.stack(grads)


def cluster_scores(fingerprints: np.ndarray, truth: list[int], seed: int) -> dict:
    clustering = cluster_fingerprints(fingerprints, ClusteringConfig(seed=seed))
    return {
        "k": clustering.k,
        "ari": round(adjusted_rand(truth, clustering.labels), 4),
        "nmi": round(normalized_mutual_info(truth, clustering.labels), 4),
        "silhouette": None if clustering.silhouette is None else round(clustering.silhouette, 4),
    }


def run_once(args, base_seed: int) -> dict:
    synth = SyntheticConfig(num_tasks=args.tasks, num_labels=args.labels, num_keys=max(args.labels, 4))
    generator = SyntheticTasks(synth)
    tokenizer = synthetic_tokenizer(synth)
    task = "causal_lm" if args.kind != "classification" else "seq_cls"
    model = tiny_model(
        args.family,
        task,
        vocab_size=len(tokenizer),
        num_labels=args.labels if task == "seq_cls" else None,
        num_layers=args.layers,
        hidden=args.hidden,
        seed=base_seed,
    )
    truth = [t for t in range(args.tasks) for _ in range(args.clients_per_task)]

    start = time.perf_counter()
    grads = client_gradients(args, truth, model, tokenizer, generator)  # (n, dim(g))
    grad_seconds = time.perf_counter() - start
    fingerprints = np.stack([project(g, args.fingerprint_seed) for g in grads])  # (n, 64)
    result = {"base_seed": base_seed, "dim_g": int(grads.shape[1]), **cluster_scores(fingerprints, truth, base_seed)}
    result["seconds_per_fingerprint"] = round(grad_seconds / len(truth), 4)

    clip = float(np.median(np.linalg.norm(grads, axis=1)))
    noise_rng = np.random.default_rng([base_seed, 0xD9])
    result["clip"] = clip
    result["dp"] = []
    for sigma in args.sigmas:
        noisy = np.stack([project(privatize(g, clip, sigma, noise_rng), args.fingerprint_seed) for g in grads])
        epsilon = round(dp_epsilon(sigma, args.delta), 4)
        row = {"sigma": sigma, "epsilon": epsilon, **cluster_scores(noisy, truth, base_seed)}
        result["dp"].append(row)

    one_task = [0] * len(truth)
    one_grads = client_gradients(args, one_task, model, tokenizer, generator)
    single = np.stack([project(g, args.fingerprint_seed) for g in one_grads])
    one = cluster_fingerprints(single, ClusteringConfig(seed=base_seed))
    result["one_task_k"] = one.k
    result["one_task_best_silhouette"] = round(max(one.scores.values()), 4) if one.scores else None
    return result


SMALL_POPULATIONS = {"2x3": (2, 3), "2x4": (2, 4), "1x6": (1, 6), "1x20": (1, 20)}


def small_n(args) -> dict:
    """Correct-K rate and ARI per population at the current K rule, see module doc."""
    synth = SyntheticConfig(num_tasks=max(args.tasks, 2), num_labels=args.labels, num_keys=max(args.labels, 4))
    generator, tokenizer = SyntheticTasks(synth), synthetic_tokenizer(synth)
    settings = {"current": (args.samples, ClusteringConfig())}
    rows = {(name, label): [] for name in SMALL_POPULATIONS for label in settings}
    for seed in args.seeds:
        model = tiny_model(
            args.family,
            "seq_cls",
            vocab_size=len(tokenizer),
            num_labels=args.labels,
            num_layers=args.layers,
            hidden=args.hidden,
            seed=seed,
        )
        probe_seed = args.fingerprint_seed + 13 * seed
        for p, (name, (tasks, per)) in enumerate(SMALL_POPULATIONS.items()):
            truth = [t for t in range(tasks) for _ in range(per)]
            encoded = [
                encode(
                    records_from_dicts(
                        generator.generate(t, 96, "classification", seed=1000 * (seed + 1) + 100 * p + c)
                    ),
                    tokenizer,
                    max_len=args.max_len,
                )
                for c, t in enumerate(truth)
            ]
            for label, (m, base) in settings.items():
                fp = FingerprintConfig(seed=probe_seed, num_samples=m)
                grads = [probe_gradient(model, fingerprint_sample(e, fp), hf_loss, fp) for e in encoded]
                points = np.stack([project(g, probe_seed) for g in grads])  # (n, 64)
                config = ClusteringConfig(null_level=base.null_level, seed=seed)
                c = cluster_fingerprints(points, config)
                rows[(name, label)].append(
                    {
                        "k": c.k,
                        "ari": adjusted_rand(truth, c.labels) if tasks > 1 else None,
                        "best_silhouette": max(c.scores.values()) if c.scores else None,
                        "null_p": c.null_p,
                    }
                )
    summary = {}
    for (name, label), runs in rows.items():
        tasks = SMALL_POPULATIONS[name][0]
        aris = [r["ari"] for r in runs if r["ari"] is not None]
        summary.setdefault(name, {})[label] = {
            "correct_k": sum(r["k"] == tasks for r in runs),
            "seeds": len(runs),
            "ari": round(float(np.mean(aris)), 4) if aris else None,
            "k": [r["k"] for r in runs],
        }
        m, config = settings[label]
        ari = "" if not aris else f" ari={np.mean(aris):.3f}"
        print(
            f"{name:5} {label:7} (m={m:3} level={config.null_level}): correct K {summary[name][label]['correct_k']}/"
            f"{len(runs)}{ari} K={summary[name][label]['k']}"
        )
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--family", choices=("gpt2", "llama", "qwen2", "mistral", "bert"), default="gpt2")
    parser.add_argument("--kind", choices=("classification", "instruction", "lm"), default="classification")
    parser.add_argument("--clients-per-task", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument(
        "--labels",
        type=int,
        default=None,
        help="classes / answer words per task (default max(4, tasks): every pair of tasks conflicts)",
    )
    parser.add_argument("--samples", type=int, default=32, help="m: examples per fingerprint")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="base-model seeds (one run each)")
    parser.add_argument("--fingerprint-seed", type=int, default=7)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02, 0.05, 0.5, 1.0, 2.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--small-n", action="store_true", help="correct-K rate at 2x3, 2x4, 1x6, 1x20 (module doc)")
    args = parser.parse_args(argv)
    if args.tasks < 2 or args.clients_per_task < 2:
        parser.error("need --tasks >= 2 and --clients-per-task >= 2")
    if args.labels is None:
        args.labels = max(4, args.tasks)
    if args.family == "bert" and args.kind != "classification":
        parser.error("bert supports --kind classification only")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if args.small_n:
        summary = {"small_n": small_n(args), "layers": args.layers, "samples": args.samples, "seeds": args.seeds}
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2))
        return summary

    runs = [run_once(args, seed) for seed in args.seeds]
    summary = {
        "family": args.family,
        "kind": args.kind,
        "tasks": args.tasks,
        "clients_per_task": args.clients_per_task,
        "samples": args.samples,
        "ari": round(float(np.mean([r["ari"] for r in runs])), 4),
        "ari_min": round(float(np.min([r["ari"] for r in runs])), 4),
        "nmi": round(float(np.mean([r["nmi"] for r in runs])), 4),
        "k": [r["k"] for r in runs],
        "one_task_k": [r["one_task_k"] for r in runs],
        "dp": [
            {
                "sigma": sigma,
                "epsilon": runs[0]["dp"][i]["epsilon"],
                "delta": args.delta,
                "ari": round(float(np.mean([r["dp"][i]["ari"] for r in runs])), 4),
                "k": [r["dp"][i]["k"] for r in runs],
            }
            for i, sigma in enumerate(args.sigmas)
        ],
        "runs": runs,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
    }

    print(
        f"family={args.family} kind={args.kind} tasks={args.tasks} clients/task={args.clients_per_task} "
        f"m={args.samples} dim(g)={runs[0]['dim_g']} seeds={args.seeds}"
    )
    for r in runs:
        print(
            f"  seed {r['base_seed']}: K={r['k']} ari={r['ari']:.3f} nmi={r['nmi']:.3f} "
            f"silhouette={r['silhouette']} one-task K={r['one_task_k']} "
            f"(best silhouette {r['one_task_best_silhouette']}) "
            f"({r['seconds_per_fingerprint'] * 1000:.0f} ms/fingerprint)"
        )
    print(
        f"ari={summary['ari']:.3f} (min {summary['ari_min']:.3f}) nmi={summary['nmi']:.3f} "
        f"chosen K={summary['k']} one-task K={summary['one_task_k']}"
    )
    print(f"DP (clip C = median ||g||, noise std sigma*C, delta={args.delta}):")
    for row in summary["dp"]:
        print(f"  sigma={row['sigma']:<5} epsilon={row['epsilon']:<12.4g} ari={row['ari']:.3f} K={row['k']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
