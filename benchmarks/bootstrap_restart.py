"""How long a restarted bootstrap takes to bind its socket, and to take its known nodes back.

The state is built once: a swarm with a trained plan (OWNERS data nodes in two clusters,
fingerprinted and planned, the coordinator's snapshot kept in the state) and NODES more
live rows with an accepted base that the snapshot does not hold (they joined after it was
kept), so the restarted bootstrap has to adopt each of them into the plan, a re-plan each.

Then a bootstrap is started on that state in a child process and timed from the moment
the process was spawned (interpreter start and imports included):
- bound_s: until its socket is bound (what nodes need to reach it at all; the bootstrap
  writes bootstrap.json right after binding, and its mtime is taken);
- ready_s: until Bootstrap.create returned (the coordinator restored: requests are served);
- adopted_s: until every known row is a member of the coordinator again (None if that took
  longer than --adopt-timeout; `adopted` then says how many rows were);
- ready_cpu_s: CPU seconds (user + system) the process had used at ready_s, a figure that
  depends less on how busy the machine is than the wall-clock ones.

    python benchmarks/bootstrap_restart.py [--nodes 1300] [--owners 8] [--adopt-timeout 600] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_p2p.capabilities import Capabilities  # noqa: E402
from nodes.config import BootstrapConfig, SwarmSpec  # noqa: E402

SPEC = SwarmSpec(model="tiny-gpt2", min_nodes=2, clusters=2)
DIGEST = "ab" * 32


def build_state(state: Path, nodes: int, owners: int) -> None:
    """OWNERS planned data nodes in the coordinator's snapshot, NODES live helper rows beyond it."""
    from nodes.assign import make_coordinator
    from nodes.bootstrap import COORDINATOR_KEY
    from nodes.peer_table import new_record, open_peer_table

    now = time.time()
    table = open_peer_table(state)
    coordinator = make_coordinator(SPEC)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 64))
    for i in range(owners + nodes):
        node_id = table.allocate_id()
        offer = Capabilities(
            memory_bytes=2_000_000_000, bandwidth_bps=100_000_000, compute_score=10.0, has_data=i < owners
        )
        address = f"127.0.0.1:{20000 + node_id}"
        table.put(dataclasses.replace(new_record(node_id, offer, address=address, now=now), base_digest=DIGEST))
        if i < owners:
            coordinator.on_join(node_id, offer, address, now=now)
            vector = centres[i % 2] + 0.05 * rng.standard_normal(64)
            coordinator.on_fingerprint(node_id, vector / np.linalg.norm(vector), 64, None, now=now)
    coordinator.maybe_assign(now=now)
    assert coordinator.assigned, "the seed swarm was not planned"
    kept = {"swarm": dataclasses.asdict(SPEC), "state": coordinator.snapshot()}
    table.set_meta(COORDINATOR_KEY, json.dumps(kept, sort_keys=True))
    table.close()


async def _restart(state: Path, adopt_timeout: float) -> dict[str, float | int | None]:
    """Start a bootstrap on `state`; the wall-clock times it was bound and had adopted every row."""
    from nodes.bootstrap import INFO_FILE, Bootstrap

    config = BootstrapConfig(
        bind="127.0.0.1:0", state_dir=state, suspect_after_s=600.0, dead_after_s=900.0, restart_grace_s=900.0
    )
    service = await Bootstrap.create(config, swarm=SPEC)
    ready_at = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    bound_at = (state / INFO_FILE).stat().st_mtime
    rows = [r.id for r in service.registry.table.rows()]
    adopted_at = None
    while time.time() < ready_at + adopt_timeout:
        if all(service.coordinator.known(n) for n in rows):
            adopted_at = time.time()
            break
        await asyncio.sleep(0.05)
    adopted = sum(service.coordinator.known(n) for n in rows)
    await service.stop()
    return {
        "bound_at": bound_at,
        "ready_at": ready_at,
        "ready_cpu_s": usage.ru_utime + usage.ru_stime,
        "adopted_at": adopted_at,
        "rows": len(rows),
        "adopted": adopted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1300, help="live rows the snapshot does not hold")
    parser.add_argument("--owners", type=int, default=8, help="planned data nodes in the snapshot")
    parser.add_argument("--adopt-timeout", type=float, default=600.0, help="seconds to wait for the adoption")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run the restart on this state
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(asyncio.run(_restart(args.child, args.adopt_timeout))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        build_state(state, args.nodes, args.owners)
        spawned = time.time()
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(state), "--adopt-timeout", str(args.adopt_timeout)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    times = json.loads(out.strip().splitlines()[-1])
    adopted_at = times["adopted_at"]
    figures = {
        "rows": times["rows"],
        "bound_s": round(times["bound_at"] - spawned, 2),
        "ready_s": round(times["ready_at"] - spawned, 2),
        "adopted_s": None if adopted_at is None else round(adopted_at - spawned, 2),
        "adopted": times["adopted"],
        "ready_cpu_s": round(times["ready_cpu_s"], 2),
    }
    print(json.dumps(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
