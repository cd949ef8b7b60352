"""Split training across two real processes equals the same steps in one process.

A bootstrap, one owner (too small for the whole model: it gets split point s and a helper)
and one pure helper, all started through `atlas-node` as real processes on 127.0.0.1.
The owner's cluster has one member, so round r's patch is exactly the owner's whole logical
adapter (owner factors + the server-side factors the helper trained and returned). The
reference runs the same N steps with OwnerSession + HelperSession in this process, from
the same base, seeds, ranks and batches; the folded updates must agree within 1e-4.
"""

import torch

from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.checkpoint import load_checkpoint
from scenarios.waiting import wait_until
from tests.split_reference import BATCH, LR, ROUNDS, SEED, STEPS, reference_patches


def test_split_rounds_across_two_processes_match_one_process(swarm, tmp_path):
    data = write_synthetic_jsonl(tmp_path / "t0.jsonl", 0, 48, seed=3)
    swarm.start_bootstrap(
        extra=["--task", "seq_cls", "--num-labels", "4", "--min-nodes", "1", "--clusters", "1", "--seed", str(SEED)]
    )
    swarm.add_node("helper", memory="100MB", out=True)
    swarm.add_node(
        "owner",
        memory="4MB",
        data=data,
        out=True,
        extra=["--rounds", str(ROUNDS), "--local-steps", str(STEPS), "--lr", str(LR), "--batch-size", str(BATCH)],
    )

    summary = wait_until(
        lambda: (swarm.summary("owner") or {}).get("finished") and swarm.summary("owner"),
        150,
        what="the owner to finish",
    )
    assert swarm.wait_exit("owner", 60) == 0, swarm.nodes["owner"].log_tail(40)
    assert swarm.wait_exit("helper", 60) == 0, swarm.nodes["helper"].log_tail(40)
    assert summary["role"] == "owner" and summary["helper"] is not None, summary
    split, ranks = summary["split"], summary["ranks"]
    assert 1 <= split < 4

    ckpt = load_checkpoint(swarm.out_dir("owner"))
    assert ckpt.base.version == ROUNDS
    expected = reference_patches(data, summary["node_id"], split, {k: int(v) for k, v in ranks.items()})
    for record, ref in zip(ckpt.base.records, expected):
        assert set(record.patch.modules) == set(ref.modules)
        helper_side = [m for m in ref.modules if int(m.split(".")[2]) >= split]
        assert helper_side, "the helper trained no module"
        for name, sf in ref.modules.items():
            torch.testing.assert_close(record.patch.modules[name].dense(), sf.dense(), atol=1e-4, rtol=0)
        for name, d in ref.dense.items():
            torch.testing.assert_close(record.patch.dense[name], d, atol=1e-4, rtol=0)
    helper_summary = swarm.summary("helper")
    assert helper_summary["steps_served"] == ROUNDS * STEPS
    bytes_ = summary["bytes_by_kind"]
    assert bytes_["activations"] > 0 and bytes_["fingerprints"] > 0 and helper_summary["bytes_by_kind"]["gradients"] > 0
