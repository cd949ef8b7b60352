"""Throughput of our codec + RPC against raw pyzmq, two processes over tcp on 127.0.0.1.

For each path a server runs in a spawned child process and the client in this one:
- raw: a blocking DEALER/ROUTER pair sending the same multipart frames with copy=False
  (header bytes, the tensor bytes, a tiny mask), the server echoing them back;
- atlas: RpcClient.call(forward) -> RpcServer handler -> backward carrying the same
  tensor back; every message goes through encode/decode with full validation.

The two paths alternate in short chunks (raw, atlas, atlas, raw, ...) so both see the
same load on a shared machine; figures are medians over chunks:
- raw_MBps, atlas_MBps: payload bytes moved per second (request + reply), 4 MiB float32;
- ratio: median of the paired per-chunk ratios atlas/raw (target >= 0.8);
- raw_ping_per_s, atlas_ping_per_s: sequential small request/reply round trips per second;
- raw_ping_pipelined_per_s, atlas_ping_pipelined_per_s: the same with 32 requests in flight;
- keyed_*: the atlas path with CurveZMQ on (what every swarm runs unless --insecure: a
  keypair each side, the server checking the client's key per request), and
  keys_ratio / keys_ping_ratio: keyed/atlas, medians of paired chunks (target >= 0.9).
  Over loopback the tensor ratio cannot reach it: CurveZMQ encrypts with
  XSalsa20-Poly1305 (about 460 MB/s per core here), four passes per echo;
- links: the same tensor echo, atlas vs keyed, with both sides' sends shaped to a link
  of the given Mbit/s (transport.link, as `--emulate-link` nodes do): what keys cost on
  the links devices have.
The three paths take turns in every chunk (the order rotates).

    python benchmarks/transport.py [--quick] [--json PATH] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

# This file is named transport.py: keep its folder off sys.path so `import transport`
# finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from transport.link import LinkProfile  # noqa: E402
from transport.messages import Backward, Forward, Ping  # noqa: E402
from transport.rpc import RpcClient, RpcServer, RpcServerConfig, install_uvloop  # noqa: E402
from transport.security import Keypair  # noqa: E402

PAYLOAD_BYTES = 4 << 20
PIPELINE_DEPTH = 32


# ---------------------------------------------------------------- servers (child processes)


def raw_server(port_queue, stop) -> None:
    """Echo every multipart message back to its sender, zero-copy."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port_queue.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not stop.is_set():
        if poller.poll(100):
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    sock.close(linger=0)


def atlas_server(port_queue, stop, use_uvloop: bool, keyed: bool = False, link_mbps: float | None = None) -> None:
    """An RpcServer answering forward with backward(grad = the activations) and ping with ok;
    `keyed`: over CURVE (its public key follows the port on the queue); `link_mbps`: replies
    shaped to that link."""
    if use_uvloop:
        install_uvloop()
    keypair = Keypair.generate() if keyed else None

    async def forward(env):
        return Backward(step=env.body.step, grad=env.body.activations, loss=0.0)

    async def ping(env):
        return None

    async def main():
        link = None if link_mbps is None else LinkProfile(bandwidth_mbps=link_mbps)
        # one client sends as fast as it can here: per-client limits on (their cost is measured), never reached
        limits = RpcServerConfig(client_rate=1e9, client_concurrency=PIPELINE_DEPTH)
        handlers = {"forward": forward, "ping": ping}
        async with RpcServer(handlers=handlers, config=limits, keypair=keypair, link=link) as server:
            port_queue.put(server.port)
            if keypair is not None:
                port_queue.put(keypair.public)
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(main())


# ---------------------------------------------------------------- clients (this process)


class RawClient:
    """A blocking DEALER doing what our RPC does, minus the codec and asyncio."""

    def __init__(self, address: str, frames: list):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address}")
        self.frames = frames
        self.ping_frames = [b"\x85ping" + b"\x00" * 40]

    def tensor(self, n: int) -> None:
        for _ in range(n):
            self.sock.send_multipart(self.frames, copy=False)
            reply = self.sock.recv_multipart(copy=False)
            assert len(reply[1]) == PAYLOAD_BYTES

    def ping(self, n: int) -> None:
        for _ in range(n):
            self.sock.send_multipart(self.ping_frames)
            self.sock.recv_multipart(copy=False)

    def ping_pipelined(self, n: int) -> None:
        for _ in range(n // PIPELINE_DEPTH):
            for _ in range(PIPELINE_DEPTH):
                self.sock.send_multipart(self.ping_frames)
            for _ in range(PIPELINE_DEPTH):
                self.sock.recv_multipart(copy=False)


class AtlasClient:
    """RpcClient calls through the full codec: forward -> backward, ping -> ok."""

    def __init__(self, client: RpcClient, address: str, activations: np.ndarray):
        self.client, self.address, self.activations = client, address, activations
        self.mask = np.ones((1, 1), np.int64)

    async def tensor(self, n: int) -> None:
        for step in range(n):
            reply = await self.client.call(
                self.address, Forward(step=step, activations=self.activations, attention_mask=self.mask), timeout=30
            )
            assert reply.grad.nbytes == PAYLOAD_BYTES

    async def ping(self, n: int) -> None:
        for _ in range(n):
            await self.client.call(self.address, Ping(), timeout=30)

    async def ping_pipelined(self, n: int) -> None:
        for _ in range(n // PIPELINE_DEPTH):
            await asyncio.gather(*(self.client.call(self.address, Ping(), timeout=30) for _ in range(PIPELINE_DEPTH)))


async def measure(paths: dict, kind: str, per_chunk: int, chunks: int) -> dict:
    """Take turns in short chunks of each path's work (the order rotating per chunk) so all
    see the same machine load.

    Returns per-chunk rates (operations per second) per path and the paired ratios
    atlas/raw (`ratio`) and keyed/atlas (`keys_ratio`).
    """
    names = list(paths)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for chunk in range(chunks):
        shift = chunk % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            work = getattr(paths[name], kind)(per_chunk)
            if asyncio.iscoroutine(work):
                await work
            rates[name].append(per_chunk / (time.perf_counter() - start))
    rates["ratio"] = [a / r for a, r in zip(rates["atlas"], rates["raw"])]
    rates["keys_ratio"] = [k / a for k, a in zip(rates["keyed"], rates["atlas"])]
    return rates


async def run_clients(
    raw_address: str,
    atlas_address: str,
    keyed_address: str,
    keyed_server_key: bytes,
    activations: np.ndarray,
    raw_frames: list,
    sizes: dict,
) -> dict:
    raw = RawClient(raw_address, raw_frames)
    async with RpcClient("bench") as client, RpcClient("bench-keyed", keypair=Keypair.generate()) as keyed_client:
        keyed_client.set_server_key(keyed_address, keyed_server_key)
        paths = {
            "raw": raw,
            "atlas": AtlasClient(client, atlas_address, activations),
            "keyed": AtlasClient(keyed_client, keyed_address, activations),
        }
        raw.ping(10)
        await paths["atlas"].ping(10)  # connect (and, keyed, handshake) before timing
        await paths["keyed"].ping(10)
        results = {kind: await measure(paths, kind, *sizes[kind]) for kind in ("tensor", "ping", "ping_pipelined")}
    raw.sock.close(linger=0)
    return results


async def linked_echo(atlas_address: str, keyed_address: str, keyed_key: bytes, mbps: float, rounds: int) -> dict:
    """Tensor echoes over an emulated `mbps` link, plain and keyed taking turns."""
    link = LinkProfile(bandwidth_mbps=mbps)
    activations = np.ones((1, PAYLOAD_BYTES // 4096, 1024), np.float32)
    async with (
        RpcClient("bench-link", link=link) as plain,
        RpcClient("bench-link-keyed", link=link, keypair=Keypair.generate()) as keyed,
    ):
        keyed.set_server_key(keyed_address, keyed_key)
        paths = {
            "atlas": AtlasClient(plain, atlas_address, activations),
            "keyed": AtlasClient(keyed, keyed_address, activations),
        }
        await paths["atlas"].ping(2)
        await paths["keyed"].ping(2)
        rates: dict[str, list[float]] = {"atlas": [], "keyed": []}
        for chunk in range(rounds):
            for name in ("atlas", "keyed") if chunk % 2 == 0 else ("keyed", "atlas"):
                start = time.perf_counter()
                await paths[name].tensor(1)
                rates[name].append(1 / (time.perf_counter() - start))
    ratios = [k / a for k, a in zip(rates["keyed"], rates["atlas"])]
    mb = 2 * PAYLOAD_BYTES / 1e6
    med = statistics.median
    return {
        "link_mbps": mbps,
        "atlas_MBps": med(rates["atlas"]) * mb,
        "keyed_MBps": med(rates["keyed"]) * mb,
        "keys_ratio": med(ratios),
    }


def start_server(ctx, target, *args) -> tuple[mp.Process, object, object]:
    """A server in a child process: (process, stop event, queue: its port first, then its key if keyed)."""
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=target, args=(ports, stop, *args), daemon=True)
    proc.start()
    return proc, stop, ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips (a few seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument(
        "--links",
        default="100,1000",
        help="comma-separated Mbit/s of emulated links for the keys on/off tensor ratio ('' to skip)",
    )
    args = parser.parse_args()
    # (round trips per chunk, chunks): chunks alternate raw and atlas
    sizes = (
        {"tensor": (5, 16), "ping": (200, 10), "ping_pipelined": (256, 10)}
        if args.quick
        else {"tensor": (5, 60), "ping": (250, 30), "ping_pipelined": (512, 30)}
    )
    use_uvloop = not args.no_uvloop and install_uvloop()

    activations = np.random.default_rng(0).standard_normal(PAYLOAD_BYTES // 4).astype(np.float32).reshape(1, -1, 1024)
    raw_frames = [
        b"\x00" * 180,
        memoryview(activations.reshape(-1).view(np.uint8)),
        np.ones((1, 1), np.int64).tobytes(),
    ]

    ctx = mp.get_context("spawn")
    raw_proc, raw_stop, raw_queue = start_server(ctx, raw_server)
    atlas_proc, atlas_stop, atlas_queue = start_server(ctx, atlas_server, use_uvloop)
    keyed_proc, keyed_stop, keyed_queue = start_server(ctx, atlas_server, use_uvloop, True)
    try:
        raw_port, atlas_port = raw_queue.get(timeout=60), atlas_queue.get(timeout=60)
        keyed_port, keyed_key = keyed_queue.get(timeout=60), keyed_queue.get(timeout=60)
        results = asyncio.run(
            run_clients(
                f"127.0.0.1:{raw_port}",
                f"127.0.0.1:{atlas_port}",
                f"127.0.0.1:{keyed_port}",
                keyed_key,
                activations,
                raw_frames,
                sizes,
            )
        )
    finally:
        for stop, proc in ((raw_stop, raw_proc), (atlas_stop, atlas_proc), (keyed_stop, keyed_proc)):
            stop.set()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()

    links = []
    for mbps in [float(x) for x in args.links.split(",") if x.strip()]:
        servers = [start_server(ctx, atlas_server, use_uvloop, keyed, mbps) for keyed in (False, True)]
        try:
            plain_port = servers[0][2].get(timeout=60)
            keyed_port, keyed_key = servers[1][2].get(timeout=60), servers[1][2].get(timeout=60)
            rounds = 6 if args.quick else 12
            links.append(
                asyncio.run(linked_echo(f"127.0.0.1:{plain_port}", f"127.0.0.1:{keyed_port}", keyed_key, mbps, rounds))
            )
        finally:
            for proc, stop, _ in servers:
                stop.set()
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()

    med = statistics.median
    mb_per_round_trip = 2 * PAYLOAD_BYTES / 1e6  # the tensor goes out and comes back
    tensor, ping, pipelined = results["tensor"], results["ping"], results["ping_pipelined"]
    figures = {
        "payload_bytes": PAYLOAD_BYTES,
        "event_loop": "uvloop" if use_uvloop else "asyncio",
        "round_trips": {kind: n * chunks for kind, (n, chunks) in sizes.items()},
        "raw_MBps": med(tensor["raw"]) * mb_per_round_trip,
        "atlas_MBps": med(tensor["atlas"]) * mb_per_round_trip,
        "ratio": med(tensor["ratio"]),
        "raw_ping_per_s": med(ping["raw"]),
        "atlas_ping_per_s": med(ping["atlas"]),
        "raw_ping_pipelined_per_s": med(pipelined["raw"]),
        "atlas_ping_pipelined_per_s": med(pipelined["atlas"]),
        "keyed_MBps": med(tensor["keyed"]) * mb_per_round_trip,
        "keyed_ping_per_s": med(ping["keyed"]),
        "keyed_ping_pipelined_per_s": med(pipelined["keyed"]),
        "keys_ratio": med(tensor["keys_ratio"]),
        "keys_ping_ratio": med(ping["keys_ratio"]),
        "keys_ping_pipelined_ratio": med(pipelined["keys_ratio"]),
        "target_keys_ratio": 0.9,
        "links": links,
        "target_ratio": 0.8,
        "load_average": list(os.getloadavg()),
    }
    figures["meets_target"] = figures["ratio"] >= figures["target_ratio"]
    figures["keys_meet_target"] = figures["keys_ratio"] >= figures["target_keys_ratio"]
    figures["keys_meet_target_on_links"] = all(x["keys_ratio"] >= figures["target_keys_ratio"] for x in links)
    figures["per_chunk"] = results

    print(
        f"transport benchmark ({figures['event_loop']}, 4 MiB float32 echo over tcp 127.0.0.1, "
        f"medians of alternating chunks, load average {figures['load_average'][0]:.1f})"
    )
    print(
        f"  raw pyzmq   {figures['raw_MBps']:9.1f} MB/s   ping {figures['raw_ping_per_s']:8.0f}/s"
        f"   pipelined {figures['raw_ping_pipelined_per_s']:8.0f}/s"
    )
    print(
        f"  atlas rpc   {figures['atlas_MBps']:9.1f} MB/s   ping {figures['atlas_ping_per_s']:8.0f}/s"
        f"   pipelined {figures['atlas_ping_pipelined_per_s']:8.0f}/s"
    )
    print(
        f"  atlas+keys  {figures['keyed_MBps']:9.1f} MB/s   ping {figures['keyed_ping_per_s']:8.0f}/s"
        f"   pipelined {figures['keyed_ping_pipelined_per_s']:8.0f}/s"
    )
    print(
        f"  ratio atlas/raw = {figures['ratio']:.3f} (median of paired chunks; "
        f"target >= 0.8: {'met' if figures['meets_target'] else 'MISSED'})"
    )
    print(
        f"  ratio keys on/off = {figures['keys_ratio']:.3f} tensors, {figures['keys_ping_ratio']:.3f} ping, "
        f"{figures['keys_ping_pipelined_ratio']:.3f} pipelined (target >= 0.9 on tensors: "
        f"{'met' if figures['keys_meet_target'] else 'MISSED'})"
    )
    for x in links:
        print(
            f"  over an emulated {x['link_mbps']:g} Mbit/s link: plain {x['atlas_MBps']:.2f} MB/s, "
            f"keys {x['keyed_MBps']:.2f} MB/s, ratio keys on/off = {x['keys_ratio']:.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
