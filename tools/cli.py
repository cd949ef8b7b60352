"""`atlas-node`: run a bootstrap, join a node, read the peer table.

    atlas-node bootstrap --bind 0.0.0.0:5555 --state ./boot
    atlas-node join --bootstrap 192.168.1.10:5555 --memory 8GB --bandwidth 50Mbps
    atlas-node peers --bootstrap 192.168.1.10:5555 [--json]

Every flag maps onto a field of a frozen config (nodes/config.py) and is checked before
anything starts. Errors are one line on stderr and an exit code from tools/exit_codes.py;
`main(argv) -> int` is the whole program, `app` is the typer app the console script runs.
Heavy modules (torch) are never imported here, so starting a node stays quick.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

try:  # typer >= 0.2x ships its own copy of click; older ones use click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _cx

from atlas_p2p.capabilities import require_bandwidth, require_memory
from nodes.config import FINGERPRINT_SAMPLES, BootstrapConfig, NodeConfig
from tools.exit_codes import ExitCode

PROG = "atlas-node"
log = logging.getLogger("atlas.cli")


class CliError(Exception):
    """A failure to report as one line and an exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: ExitCode, message: str) -> NoReturn:
    raise CliError(code, message)


class AtlasApp(typer.Typer):
    """The typer app; calling it (the console script) runs `main` and exits with its code."""

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:  # noqa: ARG002 - console entry
        sys.exit(main())


app = AtlasApp(
    name=PROG,
    help="ATLAS: many small devices fine-tune one LLM together. Run a bootstrap, join nodes, read the peer table.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _setup(
    log_level: Annotated[
        str, typer.Option("--log-level", help="Logging detail on stderr: debug, info, warning or error.")
    ] = "info",
) -> None:
    """ATLAS command line. Exit codes: 0 ok, 2 usage, 3 bad value, 4 bootstrap unreachable,
    5 address in use, 6 unusable --state, 7 refused by the bootstrap, 1 internal error."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(ExitCode.BAD_VALUE, f"--log-level: expected debug, info, warning or error, got {log_level!r}")
    configure_logging(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, not when the handler was made: a
    caller that swaps stderr and closes its copy (pytest, an in-process CLI run) leaves no
    handler writing to a closed file."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Human lines on stderr: time, level letter, source, message (replaces only our own handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_atlas_cli", False):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._atlas_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)


# --- value parsing: every failure is BAD_VALUE with the flag named ------------------


def _config(kind: type, **fields: Any) -> Any:
    try:
        return kind(**fields)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, str(exc))


def _size(flag: str, text: str) -> int:
    from transport.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _rate(flag: str, text: str) -> float:
    from transport.units import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _claim(flag: str, value: float, check: Callable[[str, float], float]) -> float:
    """`value` if `check` (a capabilities bound) accepts it; BAD_VALUE naming the flag otherwise."""
    try:
        return check(flag, value)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, str(exc))


def _noise(flag: str, text: str | None):
    from atlas_p2p.privacy.noise import ActivationNoise

    if text is None:
        return None
    try:
        return ActivationNoise.parse(text)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _sample_dp(epsilon: float | None, delta: float | None):
    from atlas_p2p.privacy.budget import SampleDP

    if epsilon is None:
        if delta is not None:
            fail(ExitCode.BAD_VALUE, "--fingerprint-delta: needs --fingerprint-epsilon")
        return None
    try:
        return SampleDP(epsilon) if delta is None else SampleDP(epsilon, delta)
    except ValueError as exc:
        flag = "--fingerprint-epsilon" if "epsilon" in str(exc) else "--fingerprint-delta"
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _check_data(flag: str, path: Path) -> None:
    """BAD_VALUE naming the file and line when `path` is not a readable data file (JSONL
    records of one kind), before the node joins: a bad file leaves no row and no --out."""
    from atlas_p2p.data import DataError, load_jsonl

    try:
        load_jsonl(path)
    except DataError as exc:
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _token(flag: str, text: str | None, insecure: bool) -> str | None:
    """The join token given as TOKEN or @FILE (one line, BAD_VALUE when unusable); None with
    --insecure. Missing both is a USAGE error that says where the token comes from."""
    from transport.security import JoinToken

    if insecure:
        if text is not None:
            fail(ExitCode.USAGE, f"{flag} and --insecure exclude each other: a token means keys")
        return None
    if text is None:
        fail(
            ExitCode.USAGE,
            f"{flag}: required (the bootstrap prints it and keeps it in its --state as join-token; "
            f"pass {flag} @STATE/join-token), or --insecure for a swarm without keys",
        )
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text().strip()
        except OSError as exc:
            fail(ExitCode.BAD_VALUE, f"{flag}: cannot read {text[1:]}: {exc.strerror or exc}")
    try:
        return JoinToken.parse(text).text()
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")


def _address(flag: str, text: str, *, allow_port_zero: bool = False) -> str:
    from nodes.config import parse_address

    try:
        parse_address(text, allow_port_zero=allow_port_zero, what=flag)
    except ValueError as exc:
        fail(ExitCode.BAD_VALUE, str(exc))
    return text.strip().removeprefix("tcp://")


def _run(main_coro: Callable[[asyncio.Event], Awaitable[Any]], bind: str | None = None) -> Any:
    """Run `main_coro(stop)` on a fresh event loop; SIGINT/SIGTERM set `stop`.

    `bind` names the --bind address for the error line when it cannot be bound."""
    from transport.rpc import install_uvloop

    install_uvloop()

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await main_coro(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    import zmq

    try:
        return asyncio.run(runner())
    except (OSError, zmq.ZMQError) as exc:
        from nodes.relay import RelayPortError

        if isinstance(exc, RelayPortError):
            fail(ExitCode.ADDRESS_IN_USE if exc.errno == errno.EADDRINUSE else ExitCode.BAD_VALUE, exc.strerror)
        if exc.errno == errno.EADDRINUSE:
            fail(ExitCode.ADDRESS_IN_USE, f"--bind: {bind or 'address'} is already in use by another process")
        if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EINVAL) and bind is not None:
            fail(ExitCode.BAD_VALUE, f"--bind: cannot listen on {bind} on this machine ({exc.strerror})")
        raise


def _check_model(name: str, task: str | None = None) -> None:
    """--model must be loadable here and of a family (and task) ATLAS runs: else one line, BAD_VALUE.

    Reads the config only (no weights); imports torch and transformers, so it runs after
    every cheap flag check."""
    from atlas_p2p.models.loading import ModelLoadError
    from nodes.modelname import check_model

    try:
        check_model(name, task)
    except ModelLoadError as exc:
        fail(ExitCode.BAD_VALUE, str(exc))


# --- commands -------------------------------------------------------------------------

# the same relay flags on `bootstrap` and `join` (nodes/relay.py)
RelayPort = Annotated[
    int | None,
    typer.Option(
        "--relay",
        help="Volunteer as a relay for nodes nobody can dial (behind a NAT): control port PORT on the "
        "--bind host; relayed nodes are reached on the --relay-slots ports after it (open PORT..PORT+slots "
        "in the firewall). The relay carries end-to-end encrypted bytes; it cannot read or forge them.",
    ),
]
RelaySlots = Annotated[
    int, typer.Option("--relay-slots", help="Most nodes this relay carries at once (one port each).")
]


@app.command()
def bootstrap(
    bind: Annotated[str, typer.Option(help="HOST:PORT to listen on, e.g. 0.0.0.0:5555 (port 0 picks a free port).")],
    state: Annotated[Path, typer.Option(help="Directory for the peer table (SQLite); reuse it after a restart.")],
    heartbeat_s: Annotated[
        float, typer.Option("--heartbeat-s", help="Heartbeat period handed to nodes, seconds.")
    ] = BootstrapConfig.heartbeat_s,
    suspect_after: Annotated[
        float | None,
        typer.Option("--suspect-after", help="Seconds of silence before a node is 'suspect' (default: 3 x heartbeat)."),
    ] = None,
    dead_after: Annotated[
        float | None,
        typer.Option("--dead-after", help="Seconds of silence before a node is 'dead' (default: 7.5 x heartbeat)."),
    ] = None,
    grace_s: Annotated[
        float | None,
        typer.Option(
            "--grace-s",
            help="After a restart, seconds nodes get to reconnect before silence counts (default: max(10, 2 x heartbeat)).",
        ),
    ] = None,
    expire_after: Annotated[
        float,
        typer.Option(
            "--expire-after",
            help="Seconds a dead or departed node's row is kept; then it is deleted (the node, if it "
            "comes back, joins as a new node).",
        ),
    ] = BootstrapConfig.expire_after_s,
    max_nodes: Annotated[
        int,
        typer.Option("--max-nodes", help="Most rows the peer table holds; a join beyond it is refused (full)."),
    ] = BootstrapConfig.max_nodes,
    join_rate: Annotated[
        float,
        typer.Option(
            "--join-rate",
            help="Joins admitted per second from all nodes together (bursts of twice as many); beyond, "
            "'busy' and the node retries. Keeps a join flood from starving members' heartbeats.",
        ),
    ] = BootstrapConfig.join_rate,
    fresh_state: Annotated[
        bool,
        typer.Option(
            "--fresh-state",
            help="If --state is damaged or partial (the bootstrap refuses it otherwise), move its files "
            "into a damaged-<time> folder there and start a new state incarnation. A whole state is kept.",
        ),
    ] = False,
    model: Annotated[
        str, typer.Option(help="The swarm's model: tiny-gpt2 | tiny-llama | tiny-bert (embedded) or an HF id/path.")
    ] = "tiny-gpt2",
    seed: Annotated[
        int | None, typer.Option(help="Fingerprint projection seed (default: drawn once, kept in --state).")
    ] = None,
    init_seed: Annotated[
        int | None,
        typer.Option(
            "--init-seed",
            help="Seed of the parameters the checkpoint lacks, e.g. a new classification "
            "head, the same on every node (default: drawn once, kept in --state).",
        ),
    ] = None,
    task: Annotated[str, typer.Option(help="The swarm's task: causal_lm or seq_cls.")] = "causal_lm",
    num_labels: Annotated[int | None, typer.Option("--num-labels", help="Classes (seq_cls only).")] = None,
    min_nodes: Annotated[int, typer.Option("--min-nodes", help="Fingerprints that trigger the first clustering.")] = 2,
    assign_after: Annotated[
        float, typer.Option("--assign-after", help="... or seconds after the first fingerprint.")
    ] = 30.0,
    clusters: Annotated[
        int | None, typer.Option(help="Fixed number of clusters (default: chosen by silhouette).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Planning workload: sequences per step.")] = 4,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Planning workload: tokens per sequence.")] = 32,
    split_mode: Annotated[
        str,
        typer.Option(
            "--split-mode",
            help="two-part (labels travel to the helper) or u-shape (head, labels and loss stay with owners).",
        ),
    ] = "two-part",
    fingerprint_samples: Annotated[
        int,
        typer.Option(
            "--fingerprint-samples",
            help="m: examples each node's fingerprint averages over (real text needs "
            "about 256; nodes compute it in micro-batches of their --batch-size).",
        ),
    ] = FINGERPRINT_SAMPLES,
    fingerprint_probe: Annotated[
        str,
        typer.Option(
            "--fingerprint-probe",
            help="what fingerprints are gradients in: lora (a rank-4 LoRA on block 0; any model) or head "
            "(a classifier's head, class-balanced, or a causal LM's zero LM head on its final features: on "
            "pretrained models it tells real-text tasks apart where lora gives one cluster).",
        ),
    ] = "lora",
    privacy_floor: Annotated[
        float | None,
        typer.Option(
            "--privacy-floor",
            help="PSI: every data node measures the Fisher leakage psi of its activations at each split on its "
            "own data and is planned to run at least the blocks after which psi <= PSI (or to wait); the peer "
            "table shows each owner's psi (values by layer: benchmarks/privacy.py).",
        ),
    ] = None,
    merge_rule: Annotated[
        str,
        typer.Option(
            "--merge-rule",
            help="exact (the weighted mean of the updates); fedavg (SplitLoRA's factor average) and mira "
            "(personal adapters pulled toward their cluster) are the evaluation's baselines.",
        ),
    ] = "exact",
    fixed_split: Annotated[
        int | None,
        typer.Option("--fixed-split", help="Every data node runs exactly this many blocks (SplitLoRA's one cut)."),
    ] = None,
    uniform_rank: Annotated[
        int | None,
        typer.Option("--uniform-rank", help="Every adapted weight gets this rank, whatever the budget (SplitLoRA)."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="No keys and no join token: anyone who reaches --bind can join or speak for any node. Debugging only.",
        ),
    ] = False,
    allow_keys: Annotated[
        Path | None,
        typer.Option(
            "--allow-keys",
            help="Directory of node public keys (*.key, each node keeps one in its --state as node.key): "
            "only these may connect (default: any node with the join token).",
        ),
    ] = None,
    hosts: Annotated[
        Path | None,
        typer.Option(
            "--hosts",
            help="Directory of node public keys (*.key) that may run other owners' layers; a helper sees "
            "their activations (and labels in two-part mode). Others train their own data only (default: any node).",
        ),
    ] = None,
    relay: RelayPort = None,
    relay_slots: RelaySlots = 4,
) -> None:
    """Run the bootstrap: peer table, liveness, clustering, planning and assignments.

    It prints the join token nodes need (`atlas-node join --token ...`) and keeps it, with
    the bootstrap's key, in --state/join-token."""
    from nodes.bootstrap import serve_bootstrap
    from nodes.config import SwarmSpec
    from nodes.peer_table import PeerTableError

    swarm = _config(
        SwarmSpec,
        model=model,
        task=task,
        num_labels=num_labels,
        min_nodes=min_nodes,
        assign_after_s=assign_after,
        clusters=clusters,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        split_mode=split_mode,
        fingerprint_samples=fingerprint_samples,
        merge_rule=merge_rule,
        fingerprint_probe=fingerprint_probe,
        fixed_split=fixed_split,
        uniform_rank=uniform_rank,
        privacy_floor=privacy_floor,
    )

    bind = _address("--bind", bind, allow_port_zero=True)
    heartbeat = heartbeat_s
    config = _config(
        BootstrapConfig,
        bind=bind,
        state_dir=state,
        heartbeat_s=heartbeat,
        suspect_after_s=suspect_after if suspect_after is not None else 3.0 * heartbeat,
        dead_after_s=dead_after if dead_after is not None else 7.5 * heartbeat,
        restart_grace_s=grace_s if grace_s is not None else max(10.0, 2.0 * heartbeat),
        sweep_s=min(0.5, heartbeat / 2),
        expire_after_s=expire_after,
        max_nodes=max_nodes,
        join_rate=join_rate,
        fresh_state=fresh_state,
        model=model,
        fingerprint_seed=seed,
        init_seed=init_seed,
        insecure=insecure,
        allow_keys=allow_keys,
        hosts=hosts,
        relay_port=relay,
        relay_slots=relay_slots,
    )
    for flag, directory in (("--allow-keys", allow_keys), ("--hosts", hosts)):
        if directory is not None:
            from transport.security import load_public_keys

            try:
                if not load_public_keys(directory):
                    fail(ExitCode.BAD_VALUE, f"{flag}: no public keys (*.key) in {directory}")
            except ValueError as exc:
                fail(ExitCode.BAD_VALUE, f"{flag}: {exc}")
    _check_model(model, task)
    from atlas_p2p.models.loading import ModelLoadError

    try:
        _run(lambda stop: serve_bootstrap(config, stop, swarm=swarm), bind=bind)
    except PeerTableError as exc:
        fail(ExitCode.STATE_ERROR, str(exc))
    except ModelLoadError as exc:
        fail(ExitCode.BAD_VALUE, str(exc))


@app.command()
def join(
    bootstrap: Annotated[str, typer.Option(help="HOST:PORT of the bootstrap.")],
    memory: Annotated[str, typer.Option(help="Memory this device lends, e.g. 512MB, 8GB, 2GiB.")],
    bandwidth: Annotated[str, typer.Option(help="Uplink bandwidth of this device, e.g. 50Mbps, 1Gbps.")],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="ATLAS_TOKEN",
            help="The join token the bootstrap printed, or @FILE (its --state/join-token). Env: ATLAS_TOKEN.",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Join a bootstrap started with --insecure (no keys). Debugging only.")
    ] = False,
    bind: Annotated[
        str, typer.Option(help="HOST:PORT for this node's own server (port 0 picks a free port).")
    ] = NodeConfig.bind,
    advertise: Annotated[str | None, typer.Option(help="HOST:PORT peers should dial (default: from --bind).")] = None,
    data: Annotated[
        Path | None, typer.Option(help="JSONL training data; without it the node joins as a helper.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name or local path (default: the bootstrap's).")] = None,
    state: Annotated[
        Path | None, typer.Option(help="Directory for node state; a restart with it keeps the node id.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Results: adapter/, metrics.jsonl, summary.json, checkpoint/ (default: --state)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of its own this node trains and contributes (merge rounds).")] = 3,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Steps per round (E).")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Tokens per sequence.")] = 32,
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Batch order seed.")] = 0,
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="Held-out JSONL: accuracy or perplexity after every round.")
    ] = None,
    split_mode: Annotated[
        str | None,
        typer.Option(
            "--split-mode", help="two-part or u-shape; must match the bootstrap's (default: the bootstrap's)."
        ),
    ] = None,
    export_rank: Annotated[
        int | None,
        typer.Option(
            "--export-rank",
            help="Cap every module of the exported PEFT adapter at this rank (lossy, error "
            "in export.json); default: exact, each module at its numerical rank.",
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads of the node's executor thread.")] = 1,
    step_timeout: Annotated[
        float, typer.Option("--step-timeout", help="Seconds a split step may take before the helper is reported.")
    ] = 10.0,
    round_deadline: Annotated[
        float, typer.Option("--round-deadline", help="Seconds after a round's first contribution the anchor publishes.")
    ] = 20.0,
    fanout: Annotated[int, typer.Option(help="Gossip fanout inside the cluster (--merge gossip).")] = 2,
    merge: Annotated[
        str,
        typer.Option(
            help="How contributions reach the anchor: reduce (partial sums up a tree, the patch back down) "
            "or gossip (every contribution to every member)."
        ),
    ] = "reduce",
    fan_in: Annotated[int, typer.Option("--fan-in", help="Children per node of the cluster's reduce tree.")] = 2,
    reduce_wait: Annotated[
        float,
        typer.Option(
            "--reduce-wait", help="Seconds a node of the reduce tree waits for its children before forwarding."
        ),
    ] = 2.0,
    wire_bf16: Annotated[
        bool,
        typer.Option(
            "--wire-bf16",
            help="Send split activations (and u-shape gradients) as bfloat16: half the bytes; the helper "
            "answers alike (accuracy effect: benchmarks/wire_bf16.py).",
        ),
    ] = False,
    activation_noise: Annotated[
        str | None,
        typer.Option(
            "--activation-noise",
            help="KIND:SCALE, KIND gaussian or laplace: noise added to the activations this node sends its "
            "helper, std SCALE x their RMS (leakage and accuracy by scale: benchmarks/privacy.py).",
        ),
    ] = None,
    fingerprint_epsilon: Annotated[
        float | None,
        typer.Option(
            "--fingerprint-epsilon",
            help="Release this node's fingerprint with sample-level differential privacy at this epsilon "
            "(one example's influence bounded, Gaussian noise; ARI by epsilon: benchmarks/privacy.py, "
            "docs/PRIVACY.md); the peer table shows it.",
        ),
    ] = None,
    fingerprint_delta: Annotated[
        float | None,
        typer.Option("--fingerprint-delta", help="The delta of --fingerprint-epsilon (default 1e-5)."),
    ] = None,
    relay: RelayPort = None,
    relay_slots: RelaySlots = 4,
    step_delay: Annotated[
        float, typer.Option("--step-delay", help="Extra seconds per step, to emulate a slow device (scenarios).")
    ] = 0.0,
    emulate_link: Annotated[
        bool,
        typer.Option(
            "--emulate-link",
            help="Shape this node's sends by its own --bandwidth (one-machine scenarios; "
            "off: on a real device the real link is the link).",
        ),
    ] = False,
    latency_ms: Annotated[
        float, typer.Option("--latency-ms", help="With --emulate-link: one-way delay added to every message sent.")
    ] = 0.0,
) -> None:
    """Join a swarm and train: fingerprint, get an assignment, train rounds, merge, export; Ctrl-C leaves cleanly."""
    from nodes.config import TrainConfig  # torch-free: flag errors come before torch is imported

    bootstrap = _address("--bootstrap", bootstrap)
    bind = _address("--bind", bind, allow_port_zero=True)
    if advertise is not None:
        advertise = _address("--advertise", advertise)
    memory_bytes = _claim("--memory", _size("--memory", memory), require_memory)
    bandwidth_bps = _claim("--bandwidth", _rate("--bandwidth", bandwidth), require_bandwidth)
    if data is not None and not data.is_file():
        fail(ExitCode.BAD_VALUE, f"--data: no such file: {data}")
    if state is not None and state.exists() and not state.is_dir():
        fail(ExitCode.STATE_ERROR, f"--state: {state} exists and is not a directory")
    token = _token("--token", token, insecure)
    config = _config(
        NodeConfig,
        bootstrap=bootstrap,
        memory_bytes=memory_bytes,
        bandwidth_bps=bandwidth_bps,
        bind=bind,
        advertise=advertise,
        data=data,
        model=model,
        state_dir=state if state is not None else out,
        token=token,
        insecure=insecure,
        relay_port=relay,
        relay_slots=relay_slots,
    )
    if eval_file is not None and not eval_file.is_file():
        fail(ExitCode.BAD_VALUE, f"--eval: no such file: {eval_file}")
    out_dir = out if out is not None else state
    if data is not None and out_dir is None:
        fail(ExitCode.BAD_VALUE, "--out: required with --data (the adapter, metrics and checkpoint go there)")
    if model is not None:
        _check_model(model)
    train = _config(
        TrainConfig,
        out_dir=out_dir,
        rounds=rounds,
        local_steps=local_steps,
        batch_size=batch_size,
        lr=lr,
        max_seq_len=max_seq_len,
        device=device,
        seed=seed,
        eval_path=eval_file,
        split_mode=split_mode,
        export_rank=export_rank,
        threads=threads,
        step_timeout_s=step_timeout,
        round_deadline_s=round_deadline,
        fanout=fanout,
        merge=merge,
        fan_in=fan_in,
        reduce_wait_s=reduce_wait,
        wire_bf16=wire_bf16,
        activation_noise=_noise("--activation-noise", activation_noise),
        fingerprint_dp=_sample_dp(fingerprint_epsilon, fingerprint_delta),
        step_delay_s=step_delay,
        emulate_link=emulate_link,
        latency_ms=latency_ms,
    )
    for flag, path in (("--data", data), ("--eval", eval_file)):
        if path is not None:
            _check_data(flag, path)
    from atlas_p2p.models.loading import ModelLoadError
    from nodes.control import JoinRefused, NodeIdentityError
    from nodes.peer import RuntimeFailure
    from tools.node_runner import run_node

    try:
        _run(lambda stop: run_node(config, stop, train), bind=bind)
    except ModelLoadError as exc:  # the swarm's model cannot be loaded on this node
        fail(ExitCode.BAD_VALUE, str(exc))
    except RuntimeFailure as exc:
        fail(ExitCode.BAD_VALUE, str(exc))
    except NodeIdentityError as exc:
        fail(ExitCode.STATE_ERROR, str(exc))
    except JoinRefused as exc:
        fail(ExitCode.REJECTED, f"bootstrap {bootstrap} refused this node: {exc.message}")


@app.command()
def peers(
    bootstrap: Annotated[str, typer.Option(help="HOST:PORT of the bootstrap.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (one object per peer).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the bootstrap.")] = 3.0,
    token: Annotated[
        str | None,
        typer.Option(envvar="ATLAS_TOKEN", help="The swarm's join token, or @FILE. Env: ATLAS_TOKEN."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Read a bootstrap started with --insecure (no keys).")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(help="Show at most this many peers, the first in id order (default: all, read in pages)."),
    ] = None,
) -> None:
    """Print the bootstrap's peer table (readable, or --json for scripts)."""
    from tools.peers_view import PeersRefused, fetch_peers, format_peer_table

    bootstrap = _address("--bootstrap", bootstrap)
    if not timeout > 0:
        fail(ExitCode.BAD_VALUE, f"--timeout: must be > 0, got {timeout}")
    if limit is not None and limit < 1:
        fail(ExitCode.BAD_VALUE, f"--limit: must be >= 1, got {limit}")
    token = _token("--token", token, insecure)
    try:
        rows = _run(lambda stop: fetch_peers(bootstrap, timeout, token=token, limit=limit))
    except PeersRefused as exc:
        fail(ExitCode.REJECTED, str(exc))
    if rows is None:
        fail(ExitCode.UNREACHABLE, f"bootstrap {bootstrap} did not answer within {timeout:g} s")
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(format_peer_table(rows))


@app.command()
def report(
    out: Annotated[
        list[Path], typer.Option("--out", help="A node's --out directory; repeat for each node (DIR/nodes/* works).")
    ],
    truth: Annotated[
        Path | None, typer.Option(help="truth.json written by a scenario: true task per node, for the ARI.")
    ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write PNG plots here (needs matplotlib).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")] = None,
) -> None:
    """Summarise a run from nodes' --out directories: per-cluster loss/eval by round, bytes, lost updates."""
    from tools.report import main as report_main

    argv = [str(p) for p in out]
    for flag, value in (("--truth", truth), ("--plots", plots), ("--json", json_path)):
        if value is not None:
            argv += [flag, str(value)]
    code = report_main(argv)
    if code:
        raise typer.Exit(code)


# --- entry point ------------------------------------------------------------------------


def _error_line(prog: str, message: str) -> None:
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit code."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name=PROG, standalone_mode=False)
    except CliError as exc:
        _error_line(PROG, exc.message)
        return int(exc.code)
    except _cx.NoArgsIsHelpError:  # typer has already printed the help
        return int(ExitCode.USAGE)
    except _cx.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        prog = ctx.command_path if ctx is not None else PROG
        hint = f" (see '{prog} --help')" if isinstance(exc, _cx.UsageError) else ""
        _error_line(prog, exc.format_message() + hint)
        return int(ExitCode.USAGE) if isinstance(exc, _cx.UsageError) else int(ExitCode.BAD_VALUE)
    except typer.Abort:
        _error_line(PROG, "aborted")
        return 130
    return int(result) if isinstance(result, int) else int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
