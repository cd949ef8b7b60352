"""Split training across two real processes equals the same steps in one process (issue #4, test a).

A bootstrap, one owner (too small for the whole model: it gets split point s and a helper)
and one pure helper, all started through `atlas-node` as real processes on 127.0.0.1.
The owner's cluster has one member, so round r's patch is exactly the owner's whole logical
adapter (owner factors + the server-side factors the helper trained and returned). The
reference runs the same N steps with OwnerSession + HelperSession in this process, from
the same base, seeds, ranks and batches; the folded updates must agree within 1e-4.
"""

import torch

from atlas_p2p.aggregation import stack_merge
from atlas_p2p.lora import attach_lora
from atlas_p2p.synthetic import write_synthetic_jsonl
from atlas_p2p.training import HelperConfig, HelperSession, OwnerConfig, OwnerSession
from nodes.checkpoint import load_checkpoint
from nodes.modelname import build_model, build_tokenizer
from nodes.peer import load_data, round_batches
from tests.runtime_launch import wait_for

SEED, LR, STEPS, ROUNDS, BATCH = 1234, 0.01, 3, 2, 4


def _reference(data, node_id, split, ranks):
    """ROUNDS rounds of STEPS split steps in one process, folding each round's patch."""
    tok = build_tokenizer("tiny-gpt2")
    encoded = load_data(data, tok, "seq_cls", 4, 32)
    owner = OwnerSession(attach_lora(build_model("tiny-gpt2", "seq_cls", 4), ranks),
                         OwnerConfig(node_id=node_id, split=split, lr=LR, run_seed=SEED, cluster="0"))
    helper = HelperSession(build_model("tiny-gpt2", "seq_cls", 4), HelperConfig(cluster="0"))
    owner.start_round(0)
    patches = []
    for r in range(ROUNDS):
        helper.begin(node_id, r, split, ranks, owner.seed, lr=LR)
        for batch in round_batches(encoded, BATCH, 0, r, STEPS):
            f = owner.forward(batch)
            out = helper.step(node_id, f.round, f.step, f.activations, f.attention_mask, f.labels,
                              base_version=owner.version)
            owner.backward(out.grad, out.loss)
        back = helper.return_adapter(node_id, r)
        patch = stack_merge([owner.contribution(None, back.factors, back.dense)])
        owner.fold(patch)
        helper.fold(patch)
        patches.append(patch)
    return patches


def test_split_rounds_across_two_processes_match_one_process(procs, tmp_path):
    data = write_synthetic_jsonl(tmp_path / "t0.jsonl", 0, 48, seed=3)
    procs.bootstrap("--heartbeat-s", "0.5", "--task", "seq_cls", "--num-labels", "4", "--min-nodes", "1",
                    "--clusters", "1", "--seed", str(SEED))
    procs.join("helper", "100MB")
    procs.join("owner", "4MB", "--data", str(data), "--rounds", str(ROUNDS), "--local-steps", str(STEPS),
               "--lr", str(LR), "--batch-size", str(BATCH))

    summary = wait_for(lambda: (procs.summary("owner") or {}).get("finished") and procs.summary("owner"), 150,
                       "the owner to finish")
    assert procs.wait_exit("owner", 60) == 0, procs.log("owner")
    assert procs.wait_exit("helper", 60) == 0, procs.log("helper")
    assert summary["role"] == "owner" and summary["helper"] is not None, summary
    split, ranks = summary["split"], summary["ranks"]
    assert 1 <= split < 4

    ckpt = load_checkpoint(tmp_path / "owner")
    assert ckpt.base.version == ROUNDS
    expected = _reference(data, summary["node_id"], split, {k: int(v) for k, v in ranks.items()})
    for record, ref in zip(ckpt.base.records, expected):
        assert set(record.patch.modules) == set(ref.modules)
        helper_side = [m for m in ref.modules if int(m.split(".")[2]) >= split]
        assert helper_side, "the helper trained no module"
        for name, sf in ref.modules.items():
            torch.testing.assert_close(record.patch.modules[name].dense(), sf.dense(), atol=1e-4, rtol=0)
        for name, d in ref.dense.items():
            torch.testing.assert_close(record.patch.dense[name], d, atol=1e-4, rtol=0)
    helper_summary = procs.summary("helper")
    assert helper_summary["steps_served"] == ROUNDS * STEPS
    bytes_ = summary["bytes_by_kind"]
    assert bytes_["activations"] > 0 and bytes_["fingerprints"] > 0 and helper_summary["bytes_by_kind"]["gradients"] > 0
