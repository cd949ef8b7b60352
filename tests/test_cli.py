"""`atlas-node` flags: help on every command, one-line errors with registry exit codes,
nothing started on a bad flag; `peers` against a live bootstrap and an unreachable one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zmq

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig
from tests.peer_rows import PEER_ROW_KEYS
from tools.cli import main
from tools.exit_codes import ExitCode

REPO = Path(__file__).resolve().parent.parent


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["--help"], ["bootstrap", "join", "peers", "--log-level"]),
        (["bootstrap", "--help"], ["--bind", "--state", "--heartbeat-s", "--suspect-after", "--dead-after"]),
        (["join", "--help"], ["--bootstrap", "--memory", "--bandwidth", "--bind", "--data", "--model", "--state"]),
        (["peers", "--help"], ["--bootstrap", "--json", "--timeout"]),
    ],
)
def test_help_explains_every_flag(argv, flags, capsys):
    code, out, _ = _run(argv, capsys)

    assert code == ExitCode.OK
    for flag in flags:
        assert flag in out


JOIN = ["join", "--bootstrap", "127.0.0.1:5555", "--memory", "8GB", "--bandwidth", "50Mbps", "--insecure"]


def _join_live(boot) -> list[str]:
    """JOIN against a running bootstrap, with its join token."""
    return ["join", "--bootstrap", boot.service.address, "--memory", "8GB", "--bandwidth", "50Mbps"] + [
        "--token",
        boot.service.token.text(),
    ]


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (_replace(JOIN, "--memory", "8XB"), ExitCode.BAD_VALUE, "--memory"),
        (_replace(JOIN, "--memory", "-1GB"), ExitCode.BAD_VALUE, "--memory"),
        (_replace(JOIN, "--memory", "1e300TB"), ExitCode.BAD_VALUE, "--memory"),
        (_replace(JOIN, "--memory", "1000TB"), ExitCode.BAD_VALUE, "--memory: 1000000000000000 bytes is above 64 TiB"),
        (_replace(JOIN, "--bandwidth", "1000Gbps"), ExitCode.BAD_VALUE, "--bandwidth: 1e+12 bit/s is above"),
        (_replace(JOIN, "--bandwidth", "fast"), ExitCode.BAD_VALUE, "--bandwidth"),
        (_replace(JOIN, "--bandwidth", "50MHz"), ExitCode.BAD_VALUE, "--bandwidth"),
        (_replace(JOIN, "--bootstrap", "localhost"), ExitCode.BAD_VALUE, "--bootstrap"),
        (_replace(JOIN, "--bootstrap", "host:99999"), ExitCode.BAD_VALUE, "--bootstrap"),
        (_replace(JOIN, "--bootstrap", "bad host:1"), ExitCode.BAD_VALUE, "--bootstrap"),
        (_replace(JOIN, "--bootstrap", "127.0.0.1:0"), ExitCode.BAD_VALUE, "--bootstrap"),
        (JOIN + ["--bind", "127.0.0.1:abc"], ExitCode.BAD_VALUE, "--bind"),
        (JOIN + ["--advertise", "nowhere"], ExitCode.BAD_VALUE, "--advertise"),
        (JOIN + ["--data", "/no/such/file.jsonl"], ExitCode.BAD_VALUE, "--data"),
        (JOIN + ["--activation-noise", "gaussian"], ExitCode.BAD_VALUE, "--activation-noise"),
        (JOIN + ["--activation-noise", "uniform:1"], ExitCode.BAD_VALUE, "--activation-noise"),
        (JOIN + ["--activation-noise", "laplace:-1"], ExitCode.BAD_VALUE, "--activation-noise"),
        (JOIN + ["--fingerprint-epsilon", "0"], ExitCode.BAD_VALUE, "--fingerprint-epsilon"),
        (JOIN + ["--fingerprint-epsilon", "inf"], ExitCode.BAD_VALUE, "--fingerprint-epsilon"),
        (JOIN + ["--fingerprint-epsilon", "8", "--fingerprint-delta", "1"], ExitCode.BAD_VALUE, "--fingerprint-delta"),
        (JOIN + ["--fingerprint-delta", "1e-6"], ExitCode.BAD_VALUE, "needs --fingerprint-epsilon"),
        (JOIN + ["--compute", "1"], ExitCode.USAGE, "--compute"),  # measured by the node, never declared
        (JOIN[:3], ExitCode.USAGE, "--memory"),
        (JOIN + ["--frobnicate"], ExitCode.USAGE, "--frobnicate"),
        (["fly"], ExitCode.USAGE, "fly"),
        (["--log-level", "loud", "peers", "--bootstrap", "127.0.0.1:1"], ExitCode.BAD_VALUE, "--log-level"),
        (["peers", "--bootstrap", "nope"], ExitCode.BAD_VALUE, "--bootstrap"),
        (["peers", "--bootstrap", "127.0.0.1:1", "--timeout", "0"], ExitCode.BAD_VALUE, "--timeout"),
        (["peers", "--bootstrap", "127.0.0.1:1", "--limit", "0"], ExitCode.BAD_VALUE, "--limit"),
    ],
)
def test_bad_flags_give_one_line_and_a_registry_code(argv, code, needle, capsys):
    got, out, err = _run(argv, capsys)

    assert got == code
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("atlas-node") and "error:" in err and needle in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bind", "127.0.0.1"], "--bind"),
        (["--bind", "127.0.0.1:70000"], "--bind"),
        (["--heartbeat-s", "0"], "heartbeat_s"),
        (["--heartbeat-s", "2", "--suspect-after", "1"], "suspect_after_s"),
        (["--suspect-after", "10", "--dead-after", "5"], "dead_after_s"),
        (["--grace-s", "-1"], "restart_grace_s"),
        (["--seed", "-5"], "fingerprint_seed"),
    ],
)
def test_bad_bootstrap_flags_start_nothing(extra, needle, tmp_path, capsys):
    state = tmp_path / "state"
    argv = ["bootstrap", "--bind", "127.0.0.1:0", "--state", str(state)]
    argv = [a for a in argv if a not in ("--bind", "127.0.0.1:0")] if "--bind" in extra else argv

    got, out, err = _run(argv + extra, capsys)

    assert got == ExitCode.BAD_VALUE
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not state.exists()  # nothing was created or started


def test_state_that_is_a_file_is_a_state_error(tmp_path, capsys):
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")

    got, _, err = _run(["bootstrap", "--bind", "127.0.0.1:0", "--state", str(blocker)], capsys)

    assert got == ExitCode.STATE_ERROR and "state" in err and len(err.strip().splitlines()) == 1


def _last_error_line(err: str) -> str:
    return [line for line in err.strip().splitlines() if "error:" in line][-1]


@contextlib.contextmanager
def _held_port():
    """A port of 127.0.0.1 another socket holds for the duration."""
    holder = zmq.Context.instance().socket(zmq.ROUTER)
    holder.setsockopt(zmq.LINGER, 0)
    try:
        yield holder.bind_to_random_port("tcp://127.0.0.1")
    finally:
        holder.close(linger=0)


def test_bind_address_in_use_is_its_own_code(tmp_path, capsys):
    with _held_port() as port:
        got, _, err = _run(["bootstrap", "--bind", f"127.0.0.1:{port}", "--state", str(tmp_path)], capsys)

    assert got == ExitCode.ADDRESS_IN_USE and "in use" in _last_error_line(err)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--relay", "70000"], "relay_port"),
        (["--relay", "65534"], "past 65535"),
        (["--relay-slots", "0"], "relay_slots"),
    ],
)
def test_bad_relay_flags_are_one_line_errors(tmp_path, capsys, flags, match):
    got, _, err = _run(["bootstrap", "--bind", "127.0.0.1:0", "--state", str(tmp_path / "s"), *flags], capsys)

    assert got == ExitCode.BAD_VALUE and match in _last_error_line(err)
    assert not (tmp_path / "s").exists()


def test_a_relay_port_in_use_is_named_as_the_relays(tmp_path, capsys):
    with _held_port() as port:
        argv = ["bootstrap", "--bind", "127.0.0.1:0", "--state", str(tmp_path), "--relay", str(port)]
        got, _, err = _run(argv, capsys)

    assert got == ExitCode.ADDRESS_IN_USE and f"--relay: cannot listen on 127.0.0.1:{port}" in _last_error_line(err)


def test_peers_of_an_unreachable_bootstrap_is_one_line_and_code_4(capsys):
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        got, out, err = _run(["peers", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "0.3", "--insecure"], capsys)
    finally:
        silent.close(linger=0)

    assert got == ExitCode.UNREACHABLE and out == ""
    assert err.strip().splitlines() == [f"atlas-node: error: bootstrap 127.0.0.1:{port} did not answer within 0.3 s"]


class _BootstrapThread:
    """A real bootstrap on its own event loop in a thread, so `main()` can run in this one."""

    def __init__(self, config: BootstrapConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service: Bootstrap = self._call(Bootstrap.create(config))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def join(self, address: str, memory_bytes: int, bandwidth_bps: int = 25_000_000) -> int:
        async def go() -> int:
            from transport.messages import Join
            from transport.rpc import RpcClient
            from transport.security import Keypair

            async with RpcClient(f"tester-{address}", keypair=Keypair.generate()) as client:
                client.set_server_key(self.service.address, self.service.keypair.public)
                reply = await client.call(
                    self.service.address,
                    Join(
                        memory_bytes=memory_bytes,
                        bandwidth_bps=bandwidth_bps,
                        compute_score=1.0,
                        address=address,
                        token=self.service.token.secret,
                    ),
                    timeout=5,
                )
            return reply.node_id

        return self._call(go())

    def close(self) -> None:
        self._call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def live_bootstrap():
    boot = _BootstrapThread(BootstrapConfig(bind="127.0.0.1:0"))
    yield boot
    boot.close()


def test_peers_limit_shows_the_first_rows(live_bootstrap, capsys):
    first = live_bootstrap.join("127.0.0.1:7101", memory_bytes=8_000_000_000)
    live_bootstrap.join("127.0.0.1:7102", memory_bytes=512_000_000)
    token = ["--token", live_bootstrap.service.token.text()]

    code, raw, _ = _run(
        ["peers", "--bootstrap", live_bootstrap.service.address, "--json", "--limit", "1", *token], capsys
    )

    assert code == ExitCode.OK
    assert [row["id"] for row in json.loads(raw)] == [first]


def test_peers_prints_a_table_and_json(live_bootstrap, capsys):
    first = live_bootstrap.join("127.0.0.1:7101", memory_bytes=8_000_000_000)
    second = live_bootstrap.join("127.0.0.1:7102", memory_bytes=512_000_000)
    address = live_bootstrap.service.address

    token = ["--token", live_bootstrap.service.token.text()]
    code, table, _ = _run(["peers", "--bootstrap", address, *token], capsys)
    code_json, raw, _ = _run(["peers", "--bootstrap", address, "--json", *token], capsys)
    refused, _, err = _run(["peers", "--bootstrap", address, "--token", "atlas1-" + "0" * 96], capsys)

    assert code == code_json == ExitCode.OK
    assert refused == ExitCode.UNREACHABLE  # another server key: the CURVE handshake never completes
    lines = table.strip().splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "ADDRESS"]
    assert "8.0 GB" in lines[1] and "512 MB" in lines[2] and lines[-1] == "2 peers: 2 alive"
    rows = json.loads(raw)
    assert [row["id"] for row in rows] == [first, second]
    for row in rows:
        assert PEER_ROW_KEYS <= set(row), sorted(PEER_ROW_KEYS - set(row))
        assert row["status"] == "alive" and row["cluster"] is None


@pytest.mark.parametrize(
    "claim, needle",
    [
        ({"memory_bytes": 10**15}, "above 64 TiB"),
        ({"memory_bytes": 10**9, "bandwidth_bps": 10**12}, "above 800 Gbit/s"),
    ],
)
def test_a_join_claiming_more_than_any_device_is_refused_and_changes_nothing(live_bootstrap, claim, needle):
    from transport.rpc import RpcError

    first = live_bootstrap.join("127.0.0.1:7101", memory_bytes=8_000_000_000)
    with pytest.raises(RpcError) as refused:
        live_bootstrap.join("127.0.0.1:7104", **claim)

    assert refused.value.code == "bad_request" and needle in refused.value.message
    assert [row["id"] for row in live_bootstrap.service.registry.rows()] == [first]


@pytest.mark.parametrize("flag", ["--data", "--eval"])
def test_a_bad_data_file_is_refused_before_joining(live_bootstrap, tmp_path, capsys, flag):
    good, bad, out = tmp_path / "good.jsonl", tmp_path / "bad.jsonl", tmp_path / "out"
    good.write_text('{"text": "a", "label": 1}\n')
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    files = {"--data": good, "--eval": good, flag: bad}
    argv = _join_live(live_bootstrap) + ["--out", str(out)]
    argv += [x for name, path in files.items() for x in (name, str(path))]

    code, _, err = _run(argv, capsys)

    assert code == ExitCode.BAD_VALUE and f"{flag}: {bad}:2: bad JSON" in _last_error_line(err)
    assert live_bootstrap.service.registry.rows() == [] and not out.exists()


def test_join_refused_by_the_bootstrap_exits_with_rejected(live_bootstrap, capsys):
    got, _, err = _run(_join_live(live_bootstrap) + ["--advertise", "0.0.0.0:7103"], capsys)

    assert got == ExitCode.REJECTED and "refused" in _last_error_line(err)


@pytest.mark.parametrize("bad", [["--bootstrap", "localhost"], ["--memory", "8XB"], ["--bandwidth", "1000Gbps"]])
def test_join_flag_errors_come_before_torch_is_imported(bad):
    argv = JOIN.copy()
    argv[argv.index(bad[0]) + 1] = bad[1]
    probe = f"import sys; from tools.cli import main; print(main({argv!r}), 'torch' in sys.modules)"

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)

    assert done.stdout.split() == [str(int(ExitCode.BAD_VALUE)), "False"], done.stderr[-400:]


def test_console_script_and_module_entry_points_run():
    script = shutil.which("atlas-node", path=str(Path(sys.executable).parent))
    assert script is not None, "the atlas-node console script is not installed in this environment"

    by_script = subprocess.run([script, "join", "--bootstrap", "x"], capture_output=True, text=True, timeout=60)
    by_module = subprocess.run(
        [sys.executable, "-m", "tools.cli", "peers", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO
    )

    assert by_script.returncode == ExitCode.USAGE
    assert by_script.stderr.strip().splitlines() == [
        "atlas-node join: error: Missing option '--memory'. (see 'atlas-node join --help')"
    ]
    assert by_module.returncode == 0 and "--json" in by_module.stdout


def test_join_with_a_corrupt_state_file_is_a_state_error(tmp_path, capsys):
    (tmp_path / "node.json").write_text("{broken")

    got, _, err = _run(JOIN + ["--state", str(tmp_path)], capsys)

    assert got == ExitCode.STATE_ERROR and "node.json" in _last_error_line(err)
