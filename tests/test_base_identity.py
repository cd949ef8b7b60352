"""One base per swarm: seeded fresh parameters, the base digest, refusal of another base.

Unit tests load tiny checkpoints saved WITHOUT a head, so AutoModelForSequenceClassification
must create one; the process tests run a bootstrap and nodes through the CLI on such a
checkpoint (no download anywhere).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.models import SEQ_CLS, base_digest, load_model, seeded_init_, tensor_seed
from atlas_p2p.models.base import mismatch_message
from atlas_p2p.synthetic import synthetic_tokenizer
from nodes.config import BootstrapConfig
from nodes.peer_table import open_peer_table
from nodes.registry import Registry, RequestError

LABELS = 4


def _headless_checkpoint(path, family: str = "bert", seed: int = 0):
    """A tiny base model (no task head) and the synthetic tokenizer, written with save_pretrained."""
    tok = synthetic_tokenizer()
    torch.manual_seed(seed)
    if family == "bert":
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        model = BertModel(config)
    else:
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = GPT2Model(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _head(model) -> torch.Tensor:
    return (model.classifier if hasattr(model, "classifier") else model.score).weight.detach().clone()


# ---- seeded init ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_missing_head_is_the_same_whatever_the_thread_and_rng_history(tmp_path, family):
    path = _headless_checkpoint(tmp_path, family)
    torch.manual_seed(1)
    first = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=7)
    other: dict = {}

    def elsewhere():  # another thread, another thread count, another global RNG history
        torch.set_num_threads(2)
        torch.manual_seed(12345)
        torch.randn(1000)
        other["model"] = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=7)

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    torch.set_num_threads(1)
    second = other["model"]
    assert first.atlas_fresh_parameters == second.atlas_fresh_parameters
    assert first.atlas_fresh_parameters  # the head really was created, not loaded
    assert torch.equal(_head(first), _head(second))
    assert _head(first).abs().sum() > 0
    third = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=8)
    assert not torch.equal(_head(first), _head(third))


def test_a_head_of_another_size_is_dropped_and_drawn_from_the_seed(tmp_path):
    from transformers import BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    a = load_model(tmp_path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=3)
    torch.manual_seed(99)
    b = load_model(tmp_path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=3)
    assert set(a.atlas_fresh_parameters) == {"classifier.weight", "classifier.bias"}
    assert a.classifier.weight.shape == (LABELS, 16) and torch.equal(a.classifier.weight, b.classifier.weight)


def test_seeded_init_rules_normal_weights_zero_biases_unit_norms_and_a_zero_padding_row():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(6, 4, padding_idx=0)
            self.proj = torch.nn.Linear(4, 3)
            self.norm = torch.nn.LayerNorm(3)

    names = ["emb.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    toy = Toy()
    applied = seeded_init_(toy, names, seed=5, std=0.5)
    assert applied == {
        "emb.weight": "normal",
        "proj.weight": "normal",
        "proj.bias": "zeros",
        "norm.weight": "ones",
        "norm.bias": "zeros",
    }
    assert torch.all(toy.emb.weight[0] == 0) and toy.emb.weight[1:].abs().sum() > 0
    assert torch.all(toy.proj.bias == 0) and torch.all(toy.norm.weight == 1) and torch.all(toy.norm.bias == 0)
    gen = torch.Generator().manual_seed(tensor_seed(5, "proj.weight"))
    assert torch.equal(toy.proj.weight, torch.empty(3, 4).normal_(0.0, 0.5, generator=gen))


def test_a_tied_weight_the_checkpoint_provided_is_never_redrawn():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    before = model.emb.weight.detach().clone()
    assert seeded_init_(model, ["head.weight"], seed=1) == {}
    assert torch.equal(model.emb.weight, before)


def test_tensor_seeds_differ_by_name_and_by_swarm_seed():
    seeds = {tensor_seed(s, n) for s in (0, 1) for n in ("classifier.weight", "score.weight")}
    assert len(seeds) == 4 and all(0 <= x < 2**63 for x in seeds)
    with pytest.raises(ValueError, match="seed"):
        tensor_seed(-1, "x")


# ---- the digest ----------------------------------------------------------------------------------------


def test_digest_changes_with_one_weight_the_dtype_or_the_revision(tmp_path):
    path = _headless_checkpoint(tmp_path)
    model = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=7)
    same = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=7)
    digest = base_digest(model, "rev")
    assert len(digest) == 64 and base_digest(same, "rev") == digest
    assert base_digest(model, "other-rev") != digest
    with torch.no_grad():
        same.bert.encoder.layer[1].attention.self.query.weight[3, 5] += 1e-6
    assert base_digest(same, "rev") != digest
    half = load_model(path, SEQ_CLS, num_labels=LABELS, offline=True, init_seed=7, dtype=torch.bfloat16)
    assert base_digest(half, "rev") != digest


# ---- the bootstrap's side ------------------------------------------------------------------------------


def _registry(state, **config):
    return Registry(open_peer_table(state), BootstrapConfig(bind="127.0.0.1:0", model="m", **config), now=0.0)


def _join(registry, port):
    offer = Capabilities(memory_bytes=100_000_000, bandwidth_bps=10_000_000, compute_score=1.0, has_data=False)
    return registry.join(offer, address=f"127.0.0.1:{port}", now=1.0).node_id


def test_the_first_accepted_base_is_the_swarms_and_another_is_refused_in_one_line(tmp_path):
    registry = _registry(tmp_path)
    a, b, c = (_join(registry, p) for p in (5001, 5002, 5003))
    assert registry.swarm_base is None
    assert registry.accept_base(a, "a" * 64, now=2.0) is True
    assert registry.accept_base(b, "a" * 64, now=2.0) is True
    with pytest.raises(RequestError) as err:
        registry.accept_base(c, "b" * 64, now=2.0)
    assert err.value.code == "base_mismatch"
    assert "bbbbbbbbbbbb" in err.value.message and "aaaaaaaaaaaa" in err.value.message
    assert "\n" not in err.value.message and "checkpoint" in err.value.message and "dtype" in err.value.message
    row = registry.table.get(c)
    assert row.status == "left" and row.base_digest is None and "refused" in row.reason
    assert registry.table.get(a).base_digest == "a" * 64
    with pytest.raises(RequestError) as bad:
        registry.accept_base(a, "not-hex", now=2.0)
    assert bad.value.code == "bad_request"


def test_the_swarm_base_and_init_seed_survive_a_restart_and_reset_with_another_model(tmp_path):
    first = _registry(tmp_path)
    node = _join(first, 5001)
    first.accept_base(node, "c" * 64, now=2.0)
    seed = first.init_seed
    first.table.close()
    again = _registry(tmp_path)
    assert again.init_seed == seed and again.swarm_base == "c" * 64
    again.table.close()
    other = Registry(open_peer_table(tmp_path), BootstrapConfig(bind="127.0.0.1:0", model="other"), now=0.0)
    assert other.swarm_base is None  # a bootstrap restarted on another model starts a new base
    other.table.close()
    fixed = _registry(tmp_path / "fixed", init_seed=42)
    assert fixed.init_seed == 42


def test_a_helper_refuses_an_owner_on_another_base():
    from nodes.collaborators import LocalNode
    from nodes.helper import HelperService
    from transport.rpc import RpcError

    # the base check reads only this node's id and base; no executor, link, assignment or patches needed
    local = LocalNode(node_id=3, base_identity={"digest": "d" * 64})
    service = HelperService(executor=None, assignments=None, local=local, patches=None)
    service._check_base(1, "d" * 64)
    for stated in ("e" * 64, ""):
        with pytest.raises(RpcError) as err:
            service._check_base(1, stated)
        assert err.value.code == "base_mismatch" and "dddddddddddd" in err.value.message
    assert mismatch_message("m", "a" * 64, "b" * 64).count("\n") == 0


# ---- real processes through the CLI --------------------------------------------------------------------


def _base_file(swarm, name):
    try:
        return json.loads((swarm.out_dir(name) / "base.json").read_text())
    except (OSError, ValueError):
        return None


def test_processes_loading_a_headless_checkpoint_share_one_base_and_a_changed_one_is_refused(swarm, tmp_path):
    ckpt = _headless_checkpoint(tmp_path / "ckpt")
    swarm.start_bootstrap(extra=["--model", str(ckpt), "--task", "seq_cls", "--num-labels", str(LABELS)])
    for name in ("a", "b"):
        swarm.add_node(name, memory="1GB", out=True)
    bases = {}
    for name in ("a", "b"):
        bases[name] = swarm.wait_until(
            lambda n=name: _base_file(swarm, n) if "accepted base" in swarm.nodes[n].log_text() else None,
            120,
            what=f"node {name} to have its base accepted",
        )
    a, b = bases["a"], bases["b"]
    assert a["digest"] == b["digest"] and a["init_seed"] == b["init_seed"]
    assert set(a["fresh_sha256"]) == {"classifier.weight", "classifier.bias"}
    assert a["fresh_sha256"] == b["fresh_sha256"]  # bit-identical heads in two processes
    assert a["fresh_sums"] == b["fresh_sums"]

    # the same path, its files changed: one weight perturbed (a node with another checkpoint)
    changed = BertModel.from_pretrained(ckpt)
    with torch.no_grad():
        changed.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
    changed.save_pretrained(ckpt)
    swarm.add_node("c", memory="1GB", out=True)
    assert swarm.wait_exit("c", 120) == 7
    log = swarm.nodes["c"].log_text()
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in log, log
    line = errors[0]
    assert "refused" in line and a["digest"][:12] in line and "checkpoint" in line
    c_digest = _base_file(swarm, "c")["digest"]
    assert c_digest != a["digest"] and c_digest[:12] in line
    assert swarm.nodes["a"].running and swarm.nodes["b"].running  # the swarm goes on
