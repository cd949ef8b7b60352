"""Benchmark of the exact stacked merge (DESIGN 8) on a GPT-2-sized layer.

For --clients contributions with ranks drawn from {2, 4, 8, 16}, α = 16 (γ_k = α/r_k)
and random sample counts, on a --dim x --dim weight:
- max_rel_error: ||B̃Ã − Σ p_k γ_k B_k A_k||_F / ||Σ p_k γ_k B_k A_k||_F, the reference
  computed densely in float64 from the same factors; the worst of --repeats draws, for
  float64 factors (must be <= 1e-6) and float32 factors (must be <= 1e-4);
- the truncation error of the lossy refactor at a few ranks, checked against the
  singular values of the dense merge;
- stacked vs dense bytes of the patch, and the break-even rank d_in d_out/(d_in + d_out);
- median timings of stack_merge, applying the patch to a weight, and refactor_lossy.

    python benchmarks/aggregation.py [--json PATH] [--clients 8] [--dim 768]

Exits non-zero if an accuracy bound is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.aggregation import (  # noqa: E402
    AdapterFactors,
    Contribution,
    dense_delta,
    dense_nbytes,
    patch_nbytes,
    refactor_lossy,
    stack_merge,
    stacked_is_smaller,
)

RANKS = (2, 4, 8, 16)
ALPHA = 16.0
BOUNDS = {"float64": 1e-6, "float32": 1e-4}


def make_contributions(gen: torch.Generator, clients: int, dim: int, dtype: torch.dtype):
    """Random trained-looking adapters: A ~ N(0, 1/d), B ~ N(0, 0.01)."""
    out = []
    for k in range(clients):
        r = RANKS[int(torch.randint(len(RANKS), (1,), generator=gen))]
        n = int(torch.randint(10, 1000, (1,), generator=gen))
        a = torch.randn(r, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        b = 0.1 * torch.randn(dim, r, generator=gen, dtype=torch.float64)
        factors = {"layer": AdapterFactors(a.to(dtype), b.to(dtype), ALPHA / r)}
        out.append(Contribution(factors, n, f"node{k:02d}", 0))
    return out


def dense_reference(contributions) -> torch.Tensor:
    """Σ_k p_k γ_k B_k A_k, one dense product per client, in float64."""
    total = sum(c.n_samples for c in contributions)
    ref = None
    for c in contributions:
        f = c.factors["layer"]
        term = (c.n_samples / total) * f.scaling * (f.B.double() @ f.A.double())
        ref = term if ref is None else ref + term
    return ref


def timed(fn, repeats: int):
    """(median seconds, last result) over ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(clients: int, dim: int, repeats: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    report: dict = {"clients": clients, "dim": dim, "repeats": repeats, "seed": seed, "alpha": ALPHA}

    # accuracy of the exact merge, per dtype
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        rel, elem = [], []
        for _ in range(repeats):
            cs = make_contributions(gen, clients, dim, dtype)
            ref = dense_reference(cs)
            got = dense_delta(stack_merge(cs), "layer").double()
            rel.append(((got - ref).norm() / ref.norm()).item())
            elem.append(((got - ref).abs().max() / ref.abs().max()).item())
        report[name] = {
            "max_rel_error": max(rel),
            "max_elementwise_rel_error": max(elem),
            "bound": BOUNDS[name],
            "ok": max(rel) <= BOUNDS[name],
        }

    # one float32 draw (the runtime's dtype) for sizes, refactor and timings
    cs = make_contributions(gen, clients, dim, torch.float32)
    report["ranks"] = [c.factors["layer"].rank for c in cs]
    patch = stack_merge(cs)
    stacked = patch.modules["layer"]
    total_rank = stacked.rank
    report["bytes"] = {
        "stacked_rank": total_rank,
        "break_even_rank": dim * dim / (2 * dim),
        "stacked": patch_nbytes(patch),
        "dense": dense_nbytes(patch),
        "ratio": patch_nbytes(patch) / dense_nbytes(patch),
        "stacked_is_smaller": stacked_is_smaller(total_rank, dim, dim),
    }

    merged = stacked.dense().double()
    sigma = torch.linalg.svdvals(merged)  # reference singular values of the dense merge
    norm = merged.norm().item()
    trunc = []
    for rank in sorted({4, 8, 16, 32, total_rank // 2, total_rank}):
        b, a, error = refactor_lossy(stacked, rank)
        expected = math.sqrt(float((sigma[rank:] ** 2).sum()))
        actual = (merged - b.double() @ a.double()).norm().item()
        trunc.append(
            {
                "rank": rank,
                "error": error,
                "rel_error": error / norm,
                "svd_tail": expected,
                "reconstruction_error": actual,
            }
        )
    report["refactor"] = trunc

    weight = torch.randn(dim, dim, generator=gen)
    t_stack, _ = timed(lambda: stack_merge(cs), repeats)
    t_apply, _ = timed(lambda: weight.add_(dense_delta(patch, "layer")), repeats)
    t_refactor, _ = timed(lambda: refactor_lossy(stacked, 16), repeats)
    t_dense, _ = timed(lambda: dense_reference(cs), repeats)
    report["timings_ms"] = {
        "stack": 1e3 * t_stack,
        "apply": 1e3 * t_apply,
        "refactor_rank16": 1e3 * t_refactor,
        "dense_reference": 1e3 * t_dense,
    }
    report["ok"] = report["float64"]["ok"] and report["float32"]["ok"]
    return report


def print_report(r: dict) -> None:
    print(
        f"exact stacked merge: {r['clients']} clients, ranks {r['ranks']} (last draw), "
        f"{r['dim']}x{r['dim']} layer, worst of {r['repeats']} draws"
    )
    for name in ("float64", "float32"):
        x = r[name]
        print(
            f"  {name}: max_rel_error {x['max_rel_error']:.3e} (bound {x['bound']:.0e}, "
            f"{'ok' if x['ok'] else 'FAIL'}), max elementwise {x['max_elementwise_rel_error']:.3e}"
        )
    b = r["bytes"]
    print(
        f"  bytes: stacked {b['stacked']:,} vs dense {b['dense']:,} (ratio {b['ratio']:.3f}); "
        f"stacked rank {b['stacked_rank']} vs break-even {b['break_even_rank']:.0f}"
    )
    print("  lossy refactor (rank: error, relative, SVD tail check):")
    for t in r["refactor"]:
        print(
            f"    r={t['rank']:4d}: {t['error']:.4e}  rel {t['rel_error']:.4f}  "
            f"tail {t['svd_tail']:.4e}  measured {t['reconstruction_error']:.4e}"
        )
    t = r["timings_ms"]
    print(
        f"  timings (median ms): stack {t['stack']:.2f}, apply {t['apply']:.2f}, "
        f"refactor(r=16) {t['refactor_rank16']:.2f}, dense reference {t['dense_reference']:.2f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    parser.add_argument("--clients", type=int, default=8, help="number of contributions (>= 1)")
    parser.add_argument("--dim", type=int, default=768, help="layer is dim x dim")
    parser.add_argument("--repeats", type=int, default=5, help="random draws per figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.dim < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--clients, --dim, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    report = run(args.clients, args.dim, args.repeats, args.seed)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
