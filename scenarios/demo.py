"""`make demo` (interim, until the training runtime lands): a local swarm, start to finish.

Starts a bootstrap and four `atlas-node join` processes on 127.0.0.1 with mixed memory
and bandwidth (one with a data file, three helpers), waits until all are alive, prints
the peer table the way `atlas-node peers` shows it, then stops every node (each sends
`leave`) and the bootstrap, and prints the table's final state. Logs stay in the work
directory (a temporary one unless --workdir is given).

    python -m scenarios.demo [--workdir DIR] [--nodes 4]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from scenarios.swarm import Swarm, SwarmError

# (name, memory, bandwidth, has data): a phone, a laptop, a desktop, a small board
DEVICES = [
    ("laptop", "8GB", "50Mbps", True),
    ("phone", "3GB", "20Mbps", False),
    ("desktop", "16GiB", "1Gbps", False),
    ("board", "512MB", "5Mbps", False),
]


def _write_sample_data(path: Path) -> Path:
    rows = [{"text": f"sample sentence number {i}", "label": i % 2} for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _terminate_on_sigterm() -> None:
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_demo(workdir: Path, n_nodes: int) -> int:
    """Run the demo in `workdir`; return a process exit code."""
    print(f"ATLAS demo: a bootstrap and {n_nodes} nodes on 127.0.0.1 (logs in {workdir}/logs)\n")
    started = time.monotonic()
    with Swarm(workdir, heartbeat_s=1.0) as swarm:
        address = swarm.start_bootstrap()
        print(f"$ atlas-node bootstrap --bind {address} --state {workdir / 'bootstrap'} --heartbeat-s 1.0")
        data = _write_sample_data(workdir / "laptop.jsonl")
        devices = [DEVICES[i % len(DEVICES)] for i in range(n_nodes)]
        names = []
        for i, (kind, memory, bandwidth, has_data) in enumerate(devices):
            name = kind if i < len(DEVICES) else f"{kind}{i}"
            names.append(name)
            swarm.add_node(name, memory=memory, bandwidth=bandwidth, data=data if has_data else None)
            flags = f" --data {data}" if has_data else ""
            print(f"$ atlas-node join --bootstrap {address} --memory {memory} --bandwidth {bandwidth}{flags}")
        ids = {name: swarm.node_id(name) for name in names}

        def all_alive_and_heartbeating() -> bool:
            rows = swarm.peers()
            return sorted(r["id"] for r in rows) == sorted(ids.values()) and all(
                r["status"] == "alive" and r["state"] == "waiting" for r in rows
            )

        swarm.wait_until(all_alive_and_heartbeating, timeout=30, what="every node alive and heartbeating")
        print(f"\n$ atlas-node peers --bootstrap {address}")
        print(swarm.run_cli("peers", "--bootstrap", address).stdout)

        print("Stopping the nodes (SIGTERM: each sends `leave`) ...")
        codes = [swarm.kill(name, signal.SIGTERM) for name in names]
        swarm.wait_until(lambda: set(swarm.statuses().values()) == {"left"}, timeout=15, what="every node left")
        print(f"$ atlas-node peers --bootstrap {address}")
        print(swarm.run_cli("peers", "--bootstrap", address).stdout)
        boot_code = swarm.kill("bootstrap", signal.SIGTERM)
    clean = all(code == 0 for code in codes) and boot_code == 0
    print(f"Node exit codes {codes}, bootstrap {boot_code}: {'clean shutdown' if clean else 'NOT clean'} "
          f"in {time.monotonic() - started:.1f} s.")
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep state and logs here (default: a temporary dir)")
    parser.add_argument("--nodes", type=int, default=len(DEVICES), help="how many nodes to start (default 4)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    _terminate_on_sigterm()
    try:
        if args.workdir is not None:
            return run_demo(args.workdir, args.nodes)
        with tempfile.TemporaryDirectory(prefix="atlas-demo-") as tmp:
            return run_demo(Path(tmp), args.nodes)
    except SwarmError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
