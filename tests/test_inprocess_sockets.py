"""An in-process swarm lifts libzmq's socket limit before its first socket.

b2's task-blind and SplitLoRA runs put 32 gossiping nodes in one process, in one context;
they needed more than libzmq's default of 1,023 sockets, and their sends failed with "Too many
open files". A fresh interpreter, because the limit only takes effect before a context's
first socket and a test process has opened many by now.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import asyncio, sys, zmq
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm

async def main(workdir):
    swarm = await InProcessSwarm.create(workdir, SwarmSpec(min_nodes=1))
    ctx = zmq.Context.instance()
    sockets = [ctx.socket(zmq.DEALER) for _ in range(1100)]  # beyond libzmq's default of 1,023
    for s in sockets:
        s.close(linger=0)
    await swarm.close()
    print("opened", len(sockets))

asyncio.run(main(sys.argv[1]))
"""


def test_an_in_process_swarm_can_open_more_sockets_than_libzmq_s_default(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "opened 1100" in done.stdout
