"""What the relay (nodes/relay.py) costs: a node's RPC server reached directly and through a
relay slot, CurveZMQ on both ways (as every swarm runs), over 127.0.0.1.

One event loop holds the node's server, the relay, the relayed node's agent and the client:
the splice's two copies share the CPU with everything else, which is the worst case for the
relay (on real hosts the relay runs on another machine). The paths alternate in chunks
(direct, relay, relay, direct, ...); figures are medians over chunks:
- ping_ms_direct, ping_ms_relay: one small request/reply round trip; added_ms: their
  difference (the latency one relayed exchange adds on a loopback link: the detour's own
  network round trip comes on top on real links, and `summary.json` reports it as rtt_ms);
- echo_MBps_direct, echo_MBps_relay: payload moved per second by a `forward` of a float32
  tensor (default 1.5 MiB: MiniLM's activations at batch 16 x 64 tokens) answered by a
  `backward` carrying it back; ratio: relay/direct of paired chunks;
- relay_bytes: what the relay spliced, both ways, against the payload it carried.

    python benchmarks/relay.py [--quick] [--json benchmarks/results/relay.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.relay import RelayAgent, RelayServer  # noqa: E402
from transport.messages import Backward, Forward, Ping  # noqa: E402
from transport.rpc import RpcClient, RpcServer, install_uvloop  # noqa: E402
from transport.security import Keypair  # noqa: E402


async def _echo(env):
    return Backward(step=env.body.step, grad=env.body.activations, loss=0.0)


async def _pong(env):
    return None


async def _pings(client: RpcClient, address: str, n: int) -> float:
    """Median round trip of n sequential pings, ms."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await client.call(address, Ping(), timeout=10)
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


async def _echoes(client: RpcClient, address: str, msg: Forward, n: int) -> float:
    """Payload MB/s (request plus reply) of n sequential forward/backward echoes."""
    t = time.perf_counter()
    for _ in range(n):
        await client.call(address, msg, timeout=30)
    return 2 * n * msg.activations.nbytes / (time.perf_counter() - t) / 1e6


async def measure(chunks: int, pings: int, echoes: int, tensor_mib: float) -> dict:
    node_keys, client_keys = Keypair.generate(), Keypair.generate()
    n = int(tensor_mib * (1 << 20) / 4)
    msg = Forward(
        step=0, activations=np.ones((1, 1, n), dtype=np.float32), attention_mask=np.ones((1, 1), dtype=np.int64)
    )
    relay = await RelayServer.create("127.0.0.1", 0)
    async with RpcServer(handlers={"forward": _echo, "ping": _pong}, keypair=node_keys) as node:
        agent = await RelayAgent.create(relay.address, node.address, label="node")
        client = await RpcClient.create("peer", keypair=client_keys)
        try:
            paths = {"direct": node.address, "relay": agent.address}
            for address in paths.values():
                client.set_server_key(address, node_keys.public)
                await client.call(address, Ping(), timeout=10)  # connect and handshake outside the clock
            ping = {k: [] for k in paths}
            echo = {k: [] for k in paths}
            carried = 0
            for i in range(chunks):
                order = list(paths) if i % 2 == 0 else list(reversed(paths))
                for name in order:
                    ping[name].append(await _pings(client, paths[name], pings))
                    echo[name].append(await _echoes(client, paths[name], msg, echoes))
                    if name == "relay":
                        carried += echoes * 2 * msg.activations.nbytes
            ratios = [r / d for r, d in zip(echo["relay"], echo["direct"], strict=True)]
            result = {
                "ping_ms_direct": round(statistics.median(ping["direct"]), 3),
                "ping_ms_relay": round(statistics.median(ping["relay"]), 3),
                "echo_MBps_direct": round(statistics.median(echo["direct"]), 1),
                "echo_MBps_relay": round(statistics.median(echo["relay"]), 1),
                "ratio": round(statistics.median(ratios), 3),
                "tensor_mib": tensor_mib,
                "relay_bytes": relay.stats.to_json()["bytes"],
                "payload_bytes_relayed": carried,
                "agent_rtt_ms": agent.rtt_ms,
                "chunks": chunks,
            }
            result["added_ms"] = round(result["ping_ms_relay"] - result["ping_ms_direct"], 3)
            return result
        finally:
            await client.stop()
            await agent.stop()
            await relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few chunks (a smoke run)")
    parser.add_argument("--tensor-mib", type=float, default=1.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    install_uvloop()
    chunks, pings, echoes = (2, 20, 4) if args.quick else (10, 200, 20)
    result = asyncio.run(measure(chunks, pings, echoes, args.tensor_mib))
    print(
        f"ping: direct {result['ping_ms_direct']:.3f} ms, through the relay {result['ping_ms_relay']:.3f} ms "
        f"(+{result['added_ms']:.3f} ms)"
    )
    print(
        f"{args.tensor_mib:g} MiB echo: direct {result['echo_MBps_direct']:.0f} MB/s, relay "
        f"{result['echo_MBps_relay']:.0f} MB/s, ratio {result['ratio']:.2f}; the relay spliced "
        f"{result['relay_bytes'] / 1e6:.1f} MB for {result['payload_bytes_relayed'] / 1e6:.1f} MB of payload"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
