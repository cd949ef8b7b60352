"""Clear errors for models: a model that cannot be used is one line, a non-zero exit,
no traceback, through the real CLI (`python -m tools.cli` subprocesses, hub offline).

The one-shot commands (they fail before binding or joining) are started together once per
module, so the interpreter start-ups overlap; each test then checks its own command.
"""

from __future__ import annotations

import pytest
from transformers import BertConfig, T5Config

from atlas_p2p.synthetic import synthetic_tokenizer
from scenarios.swarm import Swarm
from tools.exit_codes import ExitCode

HUB_ID = "atlas-tests/no-such-model"  # in no cache: loading it would need the hub


def _model_dir(root, kind: str) -> str:
    """A directory standing for a broken or unsupported checkpoint."""
    path = root / kind
    if kind == "missing":
        return str(path)
    if kind == "gguf-missing":  # a GGUF checkpoint is one file: this one is not there
        return str(root / "absent.Q4_1.gguf")
    path.mkdir()
    if kind == "t5":  # a family ATLAS cannot split
        T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50).save_pretrained(path)
    elif kind == "no-weights":  # a BERT config and tokenizer, but no weights
        BertConfig(
            vocab_size=len(synthetic_tokenizer()),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ).save_pretrained(path)
        synthetic_tokenizer().save_pretrained(path)
    return str(path)


# case -> (command, model kind, what the error line must say)
CASES = {
    "bootstrap-hub": ("bootstrap", "hub", "not in the Hugging Face cache"),
    "bootstrap-missing": ("bootstrap", "missing", "no such directory"),
    "bootstrap-t5": ("bootstrap", "t5", "'t5' checkpoint"),
    "bootstrap-task": ("bootstrap", "no-weights", "does not support task 'causal_lm'"),
    "join-hub": ("join", "hub", "not in the Hugging Face cache"),
    "join-missing": ("join", "missing", "no such directory"),
    "join-t5": ("join", "t5", "'t5' checkpoint"),
    "bootstrap-gguf": ("bootstrap", "gguf-missing", "no such GGUF file"),
    "join-gguf": ("join", "gguf-missing", "no such GGUF file"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """case -> (model name, state dir, CompletedProcess), all commands run side by side."""
    root = tmp_path_factory.mktemp("models")
    names = {
        kind: HUB_ID if kind == "hub" else _model_dir(root, kind)
        for kind in ("hub", "missing", "t5", "no-weights", "gguf-missing")
    }
    running = {}
    commands = Swarm(root / "commands", env={"HF_HUB_OFFLINE": "1"})
    for case, (command, kind, _) in CASES.items():
        state = root / f"state-{case}"
        if command == "bootstrap":
            task = [] if case == "bootstrap-task" else ["--task", "seq_cls", "--num-labels", "4"]
            args = ["bootstrap", "--bind", "127.0.0.1:0", "--state", str(state), "--model", names[kind], *task]
        else:
            args = [
                "join",
                "--bootstrap",
                "127.0.0.1:9",
                "--memory",
                "1GB",
                "--bandwidth",
                "10Mbps",
                "--model",
                names[kind],
                "--insecure",
            ]
        running[case] = (names[kind], state, commands.start_command(*args))
    try:
        return {
            case: (name, state, commands.finish_command(proc, timeout=300))
            for case, (name, state, proc) in running.items()
        }
    finally:
        commands.close()  # kills and reaps whatever still runs


def _one_error_line(text: str) -> str:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    return errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unusable_model_is_one_line_naming_it_and_bad_value(outcomes, case):
    name, state, result = outcomes[case]
    assert result.returncode == ExitCode.BAD_VALUE, result.stderr
    line = _one_error_line(result.stderr)
    assert line.startswith("atlas-node: error:") and name in line and CASES[case][2] in line
    assert not (state / "bootstrap.json").exists()  # nothing was started


def test_a_node_that_cannot_load_the_swarms_weights_exits_with_one_line(swarm, tmp_path):
    name = _model_dir(tmp_path, "no-weights")  # the bootstrap needs only the config; the node needs weights
    swarm.start_bootstrap(extra=["--model", name, "--task", "seq_cls", "--num-labels", "4"])
    swarm.add_node("n", memory="1GB", out=True)
    assert swarm.wait_exit("n", 120) == ExitCode.BAD_VALUE
    line = _one_error_line(swarm.nodes["n"].log_text())
    assert name in line and "no weights" in line


def test_a_gguf_name_is_its_folder_and_file():
    from atlas_p2p.models.loading import gguf_parts

    assert gguf_parts("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == ("/m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf_parts("owner/repo/model.GGUF") == ("owner/repo", "model.GGUF")
    assert gguf_parts("model.gguf") == (".", "model.gguf")
    assert gguf_parts("gpt2") == ("gpt2", None) and gguf_parts("/m/dir") == ("/m/dir", None)
