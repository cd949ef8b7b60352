"""Split training across two real processes equals the same steps in one process.

A bootstrap, one owner (too small for the whole model: it gets split point s and a helper)
and one pure helper, all started through `atlas-node` as real processes on 127.0.0.1.
The owner's cluster has one member, so round r's patch is exactly the owner's whole logical
adapter (owner factors + the server-side factors the helper trained and returned). The
reference runs the same N steps with OwnerSession + HelperSession in this process, from
the same base, seeds, ranks and batches; the folded updates must agree within 1e-4.
"""

from tests.split_reference import ROUNDS, STEPS, assert_folds_match_reference, train_in_processes


def test_split_rounds_across_two_processes_match_one_process(swarm):
    data, summary, helper_summary = train_in_processes(swarm, [])
    assert_folds_match_reference(swarm, data, summary, "two-part")
    assert helper_summary["steps_served"] == ROUNDS * STEPS
    bytes_ = summary["bytes_by_kind"]
    assert bytes_["activations"] > 0 and bytes_["fingerprints"] > 0 and helper_summary["bytes_by_kind"]["gradients"] > 0


def test_bfloat16_on_the_wire_halves_activation_bytes_and_matches_one_process_rounding_alike(swarm):
    data, summary, helper_summary = train_in_processes(swarm, [], owner_only=("--wire-bf16",))
    sizes: list[int] = []
    assert_folds_match_reference(swarm, data, summary, "two-part", bf16=True, sizes=sizes)
    assert helper_summary["steps_served"] == ROUNDS * STEPS
    fp32 = 4 * sum(sizes)  # the activations alone, as float32
    assert summary["bytes_by_kind"]["activations"] < 0.75 * fp32  # half of it, plus masks, labels and headers
