"""benchmarks/fingerprint_sweep.py on the embedded tiny models and a folder laid out like
../shared/data: both kinds of swarm give one fingerprint per node and per seed, and the
classification tasks are told apart from their fingerprints."""

import pytest

from atlas_p2p.synthetic import write_synthetic_jsonl
from benchmarks import fingerprint_sweep

POPULATION = {"two": {"wn_pos": 3, "fortune_topic": 3}}


@pytest.fixture
def data(tmp_path):
    for t, name in enumerate(("wn_pos", "fortune_topic")):
        write_synthetic_jsonl(tmp_path / f"{name}.train.jsonl", t, 60, kind="classification", seed=t)
    return tmp_path


@pytest.mark.parametrize(
    "model, kind, probe",
    [("tiny-bert", "seq_cls", "lora"), ("tiny-gpt2", "causal_lm", "lora"), ("tiny-gpt2", "causal_lm", "head")],
)
def test_the_sweep_fingerprints_every_node_of_either_kind(data, model, kind, probe):
    result = fingerprint_sweep.seed_sweep(
        model,
        data,
        [0, 1],
        samples=16,
        populations=POPULATION,
        examples_per_node=20,
        progress=None,
        kind=kind,
        probe=probe,
    )

    pop = result["populations"]["two"]
    assert result["kind"] == kind and len(pop["ks"]) == 2
    assert pop["examples_per_node"] == {"wn_pos": 20, "fortune_topic": 20}
    assert all(-1.0 <= pop[c] <= 1.0 for c in ("cos_within", "cos_between"))
    if kind == "seq_cls":  # the synthetic tasks differ in their labels' rules (as text alone, far less)
        assert pop["cos_within"] > pop["cos_between"] + 0.2


def test_a_causal_lm_sweep_needs_a_model(data, capsys):
    with pytest.raises(SystemExit) as exc:
        fingerprint_sweep.main(["--data", str(data), "--kind", "causal_lm"])
    assert exc.value.code == 2
    assert "--kind causal_lm needs --model" in capsys.readouterr().err
