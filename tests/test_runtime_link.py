"""--emulate-link: a node shapes its own sends by its --bandwidth (and --latency-ms); off by default."""

import pytest

from nodes.config import NodeConfig, TrainConfig
from nodes.peer import Peer
from tests.process_swarm import OFFLINE_JOIN
from transport.link import LinkProfile


def _peer(tmp_path, **train):
    config = NodeConfig(
        bootstrap="127.0.0.1:5555",
        memory_bytes=10**8,
        bandwidth_bps=20e6,
        state_dir=tmp_path,
        compute_score=1.0,
        insecure=True,
    )
    return Peer(config, TrainConfig(out_dir=None, **train))


def test_the_link_is_emulated_only_when_asked_and_from_the_nodes_own_bandwidth(tmp_path):
    assert _peer(tmp_path).link_profile() is None
    profile = _peer(tmp_path, emulate_link=True, latency_ms=7.5).link_profile()
    assert isinstance(profile, LinkProfile)
    assert profile.bandwidth_mbps == 20.0 and profile.latency_ms == 7.5 and profile.loss == 0.0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"latency_ms": 5.0}, "only with emulate_link"),
        ({"emulate_link": True, "latency_ms": -1.0}, "latency_ms"),
        ({"emulate_link": "yes"}, "emulate_link must be a bool"),
    ],
)
def test_bad_link_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out_dir=None, **fields)


def test_cli_refuses_a_latency_without_link_emulation(capsys):
    from tools.cli import main
    from tools.exit_codes import ExitCode

    args = [*OFFLINE_JOIN, "--latency-ms", "5"]
    assert main(args) == ExitCode.BAD_VALUE
    assert "only with emulate_link" in capsys.readouterr().err
