"""Launch a bootstrap and N `atlas-node join` processes on 127.0.0.1, through the CLI.

Shared by the process tests and the demo. Every child is a real `python -m tools.cli`
process with its own log file under the work directory; ports are picked by the
processes themselves (`--bind 127.0.0.1:0`) and read back from their state files
(`bootstrap.json`, `node.json`), so no port is guessed. `Swarm` is a context manager:
leaving it stops nodes with SIGTERM (they send `leave`), then the bootstrap, then
SIGKILLs whatever is left, and always reaps every child (`close(signal.SIGKILL)` kills
them all at once, as the test fixture does). Waiting is done by polling a condition
(`scenarios.waiting.wait_until`), never by bare sleeps.

    with Swarm(workdir, heartbeat_s=0.5) as swarm:
        swarm.start_bootstrap()
        swarm.add_node("a", memory="2GB", bandwidth="20Mbps")
        swarm.wait_until(lambda: swarm.statuses() == {swarm.node_id("a"): "alive"})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nodes.bootstrap import TOKEN_FILE, read_bootstrap_info
from nodes.control import IDENTITY_FILE
from scenarios.waiting import WaitTimeout, wait_until

log = logging.getLogger("atlas.swarm")

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def descendants(pid: int) -> list[int]:
    """The live descendants of process `pid` (Linux /proc), e.g. a bootstrap's forkserver
    and coordinator process."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], list(children.get(pid, []))
    while pending:
        current = pending.pop()
        if current not in found:
            found.append(current)
            pending.extend(children.get(current, []))
    return found


def status_mb(pid: int | str, key: str) -> float | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...; pid "self" for this process)
    in MB; None when unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in lines if line.startswith(key + ":")).split()[1]) / 1024.0
    return None


def tree_peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory (VmHWM) of a live process plus that of its live descendants,
    in MB (a bootstrap's figure then includes its coordinator process); None when it is gone."""
    total = sum(status_mb(p, "VmHWM") or 0.0 for p in [pid, *descendants(pid)])
    return round(total, 1) if total else None


class SwarmError(RuntimeError):
    """A child did not start, died early, or a condition was not met in time."""


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it if the launcher dies first, so a
    crashed test run leaves no orphan nodes behind (best effort; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    """One process started by the swarm."""

    name: str
    args: list[str]
    proc: subprocess.Popen
    log_path: Path
    state_dir: Path | None = None
    history: list[int] = field(default_factory=list)  # pids of earlier incarnations

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Swarm:
    """A bootstrap plus node processes on this machine (see module doc)."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        heartbeat_s: float = 0.5,
        suspect_after: float | None = None,
        dead_after: float | None = None,
        grace_s: float | None = None,
        python: str = sys.executable,
        log_level: str = "info",
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = heartbeat_s
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.grace_s = grace_s
        self.python = python
        self.log_level = log_level
        self.start_timeout = start_timeout  # default wait for the bootstrap to bind and a node to join, s
        # the children's environment: ours, unbuffered, plus `env` (e.g. HF_HUB_OFFLINE=1)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.bootstrap: Child | None = None
        self.address: str | None = None
        self.nodes: dict[str, Child] = {}
        self.bootstrap_extra: list[str] = []
        self.commands: list[subprocess.Popen[str]] = []  # short commands still running (start_command)
        self._log_counter = 0

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cli(self, *args: str) -> list[str]:
        """Command line of `atlas-node ARGS` run with this swarm's interpreter."""
        return [self.python, "-m", "tools.cli", "--log-level", self.log_level, *args]

    def _spawn(self, name: str, args: list[str], state_dir: Path | None) -> Child:
        self._log_counter += 1
        log_path = self.workdir / "logs" / f"{self._log_counter:02d}-{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=self.env,
                start_new_session=True,  # our own signals only
                preexec_fn=die_with_parent,
            )
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(args))
        return Child(name=name, args=args, proc=proc, log_path=log_path, state_dir=state_dir)

    def start_bootstrap(self, port: int = 0, timeout: float | None = None, extra: Sequence[str] | None = None) -> str:
        """Start the bootstrap on 127.0.0.1:`port` (0: a free one); return its address.

        `extra`: more `atlas-node bootstrap` flags (e.g. --min-nodes 6); a restart reuses
        the previous ones when None."""
        if self.bootstrap is not None and self.bootstrap.running:
            raise SwarmError("the bootstrap is already running")
        if extra is not None:
            self.bootstrap_extra = list(extra)
        state = self.workdir / "bootstrap"
        args = [
            "bootstrap",
            "--bind",
            f"127.0.0.1:{port}",
            "--state",
            str(state),
            "--heartbeat-s",
            str(self.heartbeat_s),
        ]
        for flag, value in (
            ("--suspect-after", self.suspect_after),
            ("--dead-after", self.dead_after),
            ("--grace-s", self.grace_s),
        ):
            if value is not None:
                args += [flag, str(value)]
        args += self.bootstrap_extra
        history = self.bootstrap.history + [self.bootstrap.pid] if self.bootstrap is not None else []
        child = self._spawn("bootstrap", self.cli(*args), state)
        child.history = history
        self.bootstrap = child

        def bound() -> str | None:
            if not child.running:
                raise SwarmError(f"bootstrap exited with {child.proc.returncode}:\n{child.log_tail()}")
            info = read_bootstrap_info(state)
            return info["address"] if info and info.get("pid") == child.pid else None

        try:
            self.address = wait_until(bound, timeout or self.start_timeout, interval=0.05, what="the bootstrap to bind")
        except WaitTimeout as exc:
            raise SwarmError(f"{exc}\n{child.log_tail()}") from None
        return self.address

    def auth_args(self) -> list[str]:
        """How `join` and `peers` prove they belong: the join token the bootstrap keeps in its
        state (`--token @FILE`), or `--insecure` when the bootstrap runs without keys."""
        if "--insecure" in self.bootstrap_extra:
            return ["--insecure"]
        return ["--token", f"@{self.workdir / 'bootstrap' / TOKEN_FILE}"]

    def restart_bootstrap(self, timeout: float | None = None) -> str:
        """Start the bootstrap again on the same port and state (after kill/stop)."""
        if self.address is None:
            raise SwarmError("the bootstrap was never started")
        if self.bootstrap is not None and self.bootstrap.running:
            raise SwarmError("stop or kill the bootstrap before restarting it")
        port = int(self.address.rpartition(":")[2])
        return self.start_bootstrap(port=port, timeout=timeout)

    def add_node(
        self,
        name: str,
        *,
        memory: str = "1GB",
        bandwidth: str = "50Mbps",
        data: Path | None = None,
        extra: Sequence[str] = (),
        out: bool = False,
    ) -> Child:
        """Start `atlas-node join` as `name` with its own --state dir under the work dir.

        `out=True` also passes that directory as `--out` (metrics, summary, adapter and
        checkpoint go there; adding the same name again resumes from it)."""
        if self.address is None:
            raise SwarmError("start the bootstrap first")
        if name in self.nodes and self.nodes[name].running:
            raise SwarmError(f"node {name!r} is already running")
        state = self.workdir / "nodes" / name
        args = [
            "join",
            "--bootstrap",
            self.address,
            "--memory",
            memory,
            "--bandwidth",
            bandwidth,
            "--bind",
            "127.0.0.1:0",
            "--state",
            str(state),
            *self.auth_args(),
        ]
        if data is not None:
            args += ["--data", str(data)]
        if out:
            args += ["--out", str(state)]
        child = self._spawn(name, self.cli(*args, *extra), state)
        if name in self.nodes:
            child.history = self.nodes[name].history + [self.nodes[name].pid]
        self.nodes[name] = child
        return child

    def node_id(self, name: str, timeout: float | None = None) -> int:
        """The id the bootstrap gave node `name` (waits until it has joined)."""
        child = self.nodes[name]

        def joined() -> int | None:
            path = child.state_dir / IDENTITY_FILE if child.state_dir else None
            if path is not None and path.exists():
                return int(json.loads(path.read_text())["node_id"])
            if not child.running:
                raise SwarmError(f"node {name} exited with {child.proc.returncode}:\n{child.log_tail()}")
            return None

        try:
            return wait_until(joined, timeout or self.start_timeout, interval=0.05, what=f"node {name} to join")
        except WaitTimeout as exc:
            raise SwarmError(f"{exc}\n{child.log_tail()}") from None

    # --- observing ---------------------------------------------------------------------------

    def peers(self, timeout: float = 3.0) -> list[dict[str, Any]]:
        """Rows from `atlas-node peers --json` (SwarmError when it fails)."""
        result = self.run_cli(
            "peers", "--bootstrap", str(self.address), "--json", "--timeout", str(timeout), *self.auth_args()
        )
        if result.returncode != 0:
            raise SwarmError(f"atlas-node peers exited {result.returncode}: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def statuses(self, timeout: float = 3.0) -> dict[int, str]:
        """{node id: status} from `atlas-node peers --json`."""
        return {row["id"]: row["status"] for row in self.peers(timeout)}

    def start_command(self, *args: str) -> subprocess.Popen[str]:
        """Start a short `atlas-node` command with its stdout and stderr piped (text).

        Several can run side by side; `close` kills and reaps any still running."""
        proc = subprocess.Popen(
            self.cli(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
            env=self.env,
        )
        self.commands.append(proc)
        return proc

    def finish_command(self, proc: subprocess.Popen[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Wait for a command from `start_command` and capture its output (killed after `timeout` s)."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.poll() is not None:
                self.commands.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run_cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a short `atlas-node` command and capture its output."""
        return self.finish_command(self.start_command(*args), timeout)

    def wait_until(
        self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "condition"
    ) -> T:
        """`wait_until` that adds the children's log tails to the error."""
        try:
            return wait_until(predicate, timeout, interval, what)
        except WaitTimeout as exc:
            raise SwarmError(f"{exc}\n{self.describe()}") from None

    def wait_exit(self, name: str, timeout: float) -> int:
        """Wait for node `name` to exit by itself; its return code (SwarmError with its log if it runs on)."""
        child = self.nodes[name]
        try:
            return child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SwarmError(f"node {name} still running after {timeout:g} s:\n{child.log_tail(40)}") from None

    def summary(self, name: str) -> dict[str, Any] | None:
        """Node `name`'s summary.json (started with out=True), or None while it has written none."""
        try:
            return json.loads((self.out_dir(name) / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        """Every child's state and last log lines, for failure messages."""
        parts = []
        for child in self.children():
            state = "running" if child.running else f"exited {child.proc.returncode}"
            parts.append(f"--- {child.name} (pid {child.pid}, {state}) ---\n{child.log_tail(10)}")
        return "\n".join(parts)

    def out_dir(self, name: str) -> Path:
        """Where node `name` keeps its state (and its results when started with out=True)."""
        return self.workdir / "nodes" / name

    def children(self) -> list[Child]:
        return ([self.bootstrap] if self.bootstrap else []) + list(self.nodes.values())

    # --- stopping ----------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send `sig` to node `name` (or "bootstrap"), wait for it to exit; its return code."""
        child = self.bootstrap if name == "bootstrap" else self.nodes[name]
        if child is None:
            raise SwarmError("no bootstrap")
        return _signal_and_reap(child, sig, timeout)

    def close(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Send `sig` to the nodes, then to the bootstrap; SIGKILL stragglers; reap all.

        SIGTERM lets nodes send `leave`; SIGKILL (the test fixture) ends them at once."""
        for proc in list(self.commands):
            proc.kill()
            proc.communicate()
            self.commands.remove(proc)
        for child in list(self.nodes.values()):
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)
        for child in list(self.nodes.values()):
            _signal_and_reap(child, None, timeout)
        if self.bootstrap is not None:
            _signal_and_reap(self.bootstrap, sig, timeout)


def _signal_and_reap(child: Child, sig: int | None, timeout: float) -> int | None:
    """Send `sig` (None: none) and wait up to `timeout` s; SIGKILL if it does not exit. Reaps."""
    if child.running and sig is not None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
    try:
        return child.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not exit in %g s: SIGKILL", child.name, child.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        return child.proc.wait(timeout=timeout)
