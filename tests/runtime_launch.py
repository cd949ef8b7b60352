"""Real-process swarms for the runtime tests: a bootstrap and `atlas-node join`s via the CLI.

Every child is a real process started through `python -m tools.cli`, reaped even when a
test fails (SIGKILL on close), with its log in the work dir for failure messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.children: dict[str, subprocess.Popen] = {}
        self.address: str | None = None

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.children[name] = proc
        return proc

    def bootstrap(self, *flags: str) -> str:
        state = self.workdir / "boot"
        self.spawn("bootstrap", "bootstrap", "--bind", "127.0.0.1:0", "--state", str(state), *flags)

        def bound():
            if self.children["bootstrap"].poll() is not None:
                raise AssertionError(f"bootstrap exited:\n{self.log('bootstrap')}")
            try:
                return json.loads((state / "bootstrap.json").read_text())["address"]
            except (OSError, ValueError, KeyError):
                return None

        self.address = wait_for(bound, 60, "the bootstrap to bind")
        return self.address

    def join(self, name: str, memory: str, *flags: str) -> subprocess.Popen:
        return self.spawn(name, "join", "--bootstrap", self.address, "--memory", memory, "--bandwidth", "50Mbps",
                          "--bind", "127.0.0.1:0", "--out", str(self.workdir / name), *flags)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def summary(self, name: str) -> dict | None:
        try:
            return json.loads((self.workdir / name / "summary.json").read_text())
        except (OSError, ValueError):
            return None

    def node_id(self, name: str) -> int | None:
        try:
            return json.loads((self.workdir / name / "node.json").read_text())["node_id"]
        except (OSError, ValueError, KeyError):
            return None

    def wait_exit(self, name: str, timeout: float) -> int:
        try:
            return self.children[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:g} s:\n{self.log(name)}") from None

    def kill(self, name: str) -> None:
        proc = self.children[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
