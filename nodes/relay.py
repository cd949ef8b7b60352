"""The relay (issue 13): a reachable node or the bootstrap carries the swarm's connections to
a node nobody can dial.

`RelayServer` runs on the volunteer (`--relay PORT`). A node the bootstrap could not dial back
opens a `RelayAgent`: one outbound control connection that gets a slot, a port on the relay
the swarm can dial. Each connection a peer opens on the slot is announced to the agent
(`open`), the agent dials the relay again for it (`data`), and both ends splice bytes: the
relay between the peer and the agent, the agent between the relay and the node's own RPC
server. Nothing inbound ever reaches the NAT'd node; the ZeroMQ session and its CURVE
handshake run end to end, so the relay carries ciphertext it can neither read nor forge.
Frames and slot ports: transport/relay_wire.py.

The relay trusts nobody: a connection that sends a bad frame, or none in time, is closed; a
`data` frame must name a connection the relay is waiting for (ids are random); an agent gets
at most one slot per control connection and the relay has `slots` of them; a control
connection silent for SILENCE_S (the agent pings every PING_S, the relay answers) is dead on
either side, and its slot is freed. Both sides count
the bytes they splice (`RelayStats`, `RelayAgent.bytes_in/out`) and the agent measures the
round trip to the relay (`rtt_ms`), the latency a relayed hop adds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodes.config import parse_address
from transport.relay_wire import (
    LENGTH,
    Frame,
    RelayFrameError,
    decode_frame,
    encode_frame,
    frame_length,
    relay_dial_address,
    slot_ports,
)

log = logging.getLogger("atlas.relay")

HELLO_TIMEOUT_S = 5.0  # a new control connection names itself (hello or data) within this
PAIR_TIMEOUT_S = 5.0  # an agent dials back for a peer's connection within this
DIAL_TIMEOUT_S = 5.0  # the agent's own dials (relay, local server)
PING_S = 5.0  # the agent's round-trip probe
SILENCE_S = 4 * PING_S  # a control connection silent this long is dead (a vanished NAT mapping, a
# powered-off node: TCP alone would hold the slot, or wait on the relay, for many minutes)
CHUNK = 1 << 16
_IO_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError, RelayFrameError, TimeoutError)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::", "")


def listen_host(host: str) -> str:
    """A bind host as asyncio takes it: ZeroMQ's "*" is every interface, "[::]" loses its brackets."""
    return "0.0.0.0" if host == "*" else host.strip("[]")


def loopback_if_wildcard(host: str) -> str:
    """Where this machine dials its own server bound on `host` (a wildcard: the loopback)."""
    if host in ("*", "0.0.0.0", ""):
        return "127.0.0.1"  # ("[::]": "[::1]" below)
    return "[::1]" if host in ("[::]", "::") else host


class RelayPortError(OSError):
    """The relay's control port cannot be opened (in use, or no such address here)."""


class RelayRefused(RuntimeError):
    """The relay gave no slot (its `refused` reason)."""


async def read_frame(reader: asyncio.StreamReader, timeout: float | None) -> Frame:
    """The next control frame; RelayFrameError, IncompleteReadError or TimeoutError otherwise."""

    async def read() -> Frame:
        n = frame_length(await reader.readexactly(LENGTH.size))
        return decode_frame(await reader.readexactly(n))

    return await asyncio.wait_for(read(), timeout)


async def send_frame(writer: asyncio.StreamWriter, kind: str, value: Any) -> None:
    writer.write(encode_frame(kind, value))
    await asyncio.wait_for(writer.drain(), DIAL_TIMEOUT_S)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(*_IO_ERRORS):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Callable[[int], None]) -> None:
    with contextlib.suppress(*_IO_ERRORS):
        while data := await reader.read(CHUNK):
            count(len(data))
            writer.write(data)
            await writer.drain()


async def splice(a: Stream, b: Stream, a_to_b: Callable[[int], None], b_to_a: Callable[[int], None]) -> None:
    """Copy bytes both ways until either side closes, then close both (a ZeroMQ session has
    no use for half a connection); `a_to_b(n)`/`b_to_a(n)` count what moved."""
    pumps = [asyncio.create_task(_pump(a[0], b[1], a_to_b)), asyncio.create_task(_pump(b[0], a[1], b_to_a))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _close(a[1])
        await _close(b[1])


@dataclass
class RelayStats:
    """What a relay carried: bytes by relayed node (its hello label) and by direction."""

    bytes_by_node: collections.Counter = field(default_factory=collections.Counter)
    to_node: int = 0  # peers -> relayed nodes
    from_node: int = 0  # relayed nodes -> peers
    connections: int = 0  # peer connections spliced
    refused: int = 0  # hellos without a slot
    bad: int = 0  # connections closed for a bad or missing frame, or an unknown conn id

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes": self.to_node + self.from_node,
            "to_node": self.to_node,
            "from_node": self.from_node,
            "bytes_by_node": dict(self.bytes_by_node),
            "connections": self.connections,
            "refused": self.refused,
            "bad": self.bad,
        }


@dataclass(eq=False)  # identity: one per control connection
class _Agent:
    label: str
    writer: asyncio.StreamWriter
    address: str = ""


class RelayServer:
    """Relay for nodes nobody can dial: control port `port`, slots on the ports after it
    (`transport.relay_wire.slot_ports`); peers are told `advertise_host`:slot."""

    def __init__(self, host: str, advertise_host: str, slots: int) -> None:
        # "" (a bootstrap bound to every interface): slots are told as ":PORT", on the host the
        # relayed node dials the relay at
        self.host, self.advertise_host, self.slots = host, advertise_host, slots
        self.port = 0
        self.stats = RelayStats()
        self._control: asyncio.AbstractServer | None = None
        self._free: list[int] = []
        self._agents: set[_Agent] = set()
        self._pending: dict[int, tuple[_Agent, asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    @classmethod
    async def create(cls, host: str, port: int, *, advertise_host: str | None = None, slots: int = 4) -> RelayServer:
        if advertise_host is None:
            advertise_host = "" if host in WILDCARD_HOSTS else host
        self = cls(host, advertise_host, slots)
        free = slot_ports(port, slots)  # checks port and slots before anything opens
        try:
            self._control = await asyncio.start_server(self._on_control, listen_host(host), port)
        except OSError as exc:
            raise RelayPortError(exc.errno, f"--relay: cannot listen on {host}:{port} ({exc.strerror})") from None
        self.port = self._control.sockets[0].getsockname()[1]
        self._free = free
        log.info("relay on %s:%d for up to %d nodes nobody can dial", host, self.port, slots)
        return self

    @property
    def address(self) -> str:
        """HOST:PORT relayed nodes dial (the control port)."""
        return f"{self.advertise_host}:{self.port}"

    @property
    def relayed(self) -> dict[str, str]:
        """Relayed node label -> the address the swarm reaches it at."""
        return {a.label: a.address for a in self._agents if a.address}

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._control is not None:
            self._control.close()
        for _, future in self._pending.values():
            future.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, *_IO_ERRORS):
                await task

    # --- connections ---------------------------------------------------------------------

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        with contextlib.suppress(asyncio.CancelledError):  # stop(): asyncio's server callback would log it
            await self._control_connection(reader, writer)

    async def _control_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            frame = await read_frame(reader, HELLO_TIMEOUT_S)
        except _IO_ERRORS as exc:
            self.stats.bad += 1
            log.info("relay: closed a connection that sent no frame in time or a bad one (%s)", exc)
            await _close(writer)
            return
        if frame.kind == "hello":
            await self._serve_agent(_Agent(frame.value, writer), reader)
        elif frame.kind == "data":
            await self._pair(frame.value, reader, writer)
        else:
            self.stats.bad += 1
            await _close(writer)

    async def _serve_agent(self, agent: _Agent, reader: asyncio.StreamReader) -> None:
        """Give the agent a slot and keep it while the control connection lives (pings answered)."""
        writer = agent.writer
        slot = None
        try:
            if not self._free:
                self.stats.refused += 1
                await send_frame(writer, "refused", f"this relay's {self.slots} slots are taken")
                return
            port = self._free.pop(0)
            try:
                slot = await asyncio.start_server(
                    lambda r, w: self._on_peer(agent, r, w), listen_host(self.host), port, reuse_address=True
                )
            except OSError as exc:
                self._free.append(port)
                self.stats.refused += 1
                await send_frame(writer, "refused", f"slot port {port} cannot be opened: {exc.strerror or exc}")
                return
            agent.address = f"{self.advertise_host}:{slot.sockets[0].getsockname()[1]}"
            self._agents.add(agent)
            await send_frame(writer, "slot", agent.address)
            log.info("relay: node %s is reached at %s", agent.label, agent.address)
            while True:
                frame = await read_frame(reader, SILENCE_S)
                if frame.kind != "ping":
                    self.stats.bad += 1
                    break
                await send_frame(writer, "pong", frame.value)
        except _IO_ERRORS:
            pass
        finally:
            self._agents.discard(agent)
            if slot is not None:
                slot.close()
                self._free.append(port)  # 0 (any free port) goes back as it came
                log.info("relay: node %s left its slot %s", agent.label, agent.address)
            for conn, (owner, future) in list(self._pending.items()):
                if owner is agent:
                    future.cancel()
                    self._pending.pop(conn, None)
            await _close(writer)

    async def _on_peer(self, agent: _Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        with contextlib.suppress(asyncio.CancelledError):  # stop(): asyncio's server callback would log it
            await self._peer_connection(agent, reader, writer)

    async def _peer_connection(self, agent: _Agent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A peer dialled the agent's slot: ask the agent for a data connection, then splice."""
        conn = secrets.randbits(62)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[conn] = (agent, future)
        try:
            await send_frame(agent.writer, "open", conn)
            data = await asyncio.wait_for(future, PAIR_TIMEOUT_S)
        except (*_IO_ERRORS, asyncio.CancelledError):
            await _close(writer)
            return
        finally:
            self._pending.pop(conn, None)
        self.stats.connections += 1

        def to_node(n: int) -> None:
            self.stats.to_node += n
            self.stats.bytes_by_node[agent.label] += n

        def from_node(n: int) -> None:
            self.stats.from_node += n
            self.stats.bytes_by_node[agent.label] += n

        await splice((reader, writer), data, to_node, from_node)

    async def _pair(self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An agent's data connection for `conn`: hand it to the waiting peer connection and
        stay until the splice closes it (this coroutine owns the connection)."""
        entry = self._pending.pop(conn, None)
        if entry is None or entry[1].done():
            self.stats.bad += 1
            await _close(writer)
            return
        entry[1].set_result((reader, writer))
        with contextlib.suppress(*_IO_ERRORS):
            await writer.wait_closed()


class RelayAgent:
    """The relayed node's side: holds a slot on `relay` and splices every connection the
    relay announces to the node's own server at `local` (HOST:PORT)."""

    def __init__(self, relay: str, local: str) -> None:
        self.relay, self.local = relay, local
        self.address = ""  # where the swarm reaches this node (the slot)
        self.bytes_in = 0  # relay -> this node's server
        self.bytes_out = 0  # this node's server -> relay
        self.connections = 0
        self.rtt_ms: float | None = None  # latest round trip to the relay
        self._rtts: collections.deque[float] = collections.deque(maxlen=64)  # the recent ones
        self.lost = asyncio.Event()  # the control connection closed
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    @classmethod
    async def create(cls, relay: str, local: str, *, label: str = "") -> RelayAgent:
        """Connect, say hello, get a slot; RelayRefused, or OSError/TimeoutError when the relay
        cannot be reached or answers nonsense."""
        self = cls(relay, local)
        host, port = parse_address(relay, what="relay")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), DIAL_TIMEOUT_S)
        try:
            await send_frame(writer, "hello", label[:64])
            frame = await read_frame(reader, DIAL_TIMEOUT_S)
            if frame.kind == "refused":
                raise RelayRefused(frame.value)
            if frame.kind != "slot":
                raise RelayFrameError(f"the relay answered hello with {frame.kind}")
            slot = relay_dial_address(frame.value, relay)
            if parse_address(slot, what="relay slot")[0] in WILDCARD_HOSTS:
                raise RelayFrameError(f"the relay gave a slot nobody can dial: {slot}")
        except BaseException:
            await _close(writer)
            raise
        self.address, self._writer = slot, writer
        self._spawn(self._read(reader), "relay-control")
        self._spawn(self._ping(), "relay-ping")
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "via": self.relay,
            "address": self.address,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "connections": self.connections,
            "rtt_ms": self.rtt_ms,
            # the median of the last 64 (a ping every PING_S): one slow answer says little
            "rtt_ms_median": statistics.median(self._rtts) if self._rtts else None,
        }

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, *_IO_ERRORS):
                await task
        if self._writer is not None:
            await _close(self._writer)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader, SILENCE_S)
                if frame.kind == "open":
                    self._spawn(self._serve(frame.value), f"relay-conn-{frame.value}")
                elif frame.kind == "pong":
                    self.rtt_ms = max(0.0, (time.perf_counter() - frame.value) * 1000.0)
                    self._rtts.append(self.rtt_ms)
                else:
                    log.warning("relay %s sent %s on the control connection; leaving it", self.relay, frame.kind)
                    break
        except _IO_ERRORS as exc:
            if not self._stopped:
                log.warning("lost the relay %s (%s)", self.relay, exc or type(exc).__name__)
        finally:
            self.lost.set()

    async def _ping(self) -> None:
        with contextlib.suppress(*_IO_ERRORS):
            while not self.lost.is_set():
                await send_frame(self._writer, "ping", time.perf_counter())  # uvloop's clock ticks in ms
                await asyncio.sleep(PING_S)

    async def _serve(self, conn: int) -> None:
        """Dial the relay for `conn` and the node's server, then splice them."""
        opened: list[asyncio.StreamWriter] = []
        try:
            host, port = parse_address(self.relay, what="relay")
            relay = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), DIAL_TIMEOUT_S)
            opened.append(relay[1])
            await send_frame(relay[1], "data", conn)
            host, port = parse_address(self.local, what="local server")
            local = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), DIAL_TIMEOUT_S)
            opened.append(local[1])
        except _IO_ERRORS as exc:
            log.info("relay connection %d not opened: %s", conn, exc)
            for writer in opened:
                await _close(writer)
            return
        self.connections += 1

        def inbound(n: int) -> None:
            self.bytes_in += n

        def outbound(n: int) -> None:
            self.bytes_out += n

        await splice(relay, local, inbound, outbound)


RETRY_S = 30.0  # after no relay gave a slot, the next attempt waits this long
VERDICT_S = 10.0  # a slot's own verdict comes within this (REACH_TIMEOUT_S plus a join and a beat)


class Relaying:
    """A node's use of relays. When the bootstrap's verdict is that nobody can dial this node
    and it names relays (`beat.relays`), take a slot on the first that gives one and advertise
    the slot instead (`readvertise(slot, relay)`: the node joins again with it, the bootstrap
    dials it back through the relay). When the relay is lost, advertise the node's own address
    again; the bootstrap's next verdict starts over."""

    def __init__(
        self,
        local: str,
        own: str,
        bootstrap: str,
        readvertise: Callable[[str, str], None],
        label: Callable[[], str] = str,
    ) -> None:
        self.local = local  # HOST:PORT of this node's server, as the agent dials it
        self.own = own  # the address the node advertises when no relay carries it
        self.bootstrap = bootstrap
        self.readvertise = readvertise
        self.label = label  # () -> the node id, for the relay's logs and counts
        self.agent: RelayAgent | None = None
        self.past: list[dict[str, Any]] = []  # agents lost, as to_json() left them
        self._task: asyncio.Task | None = None
        self._not_before = 0.0
        self._since = 0.0  # when the current slot was advertised
        self._failed: set[str] = set()  # relays whose slot the bootstrap could not dial either

    def on_beat(self, reply: Any) -> None:
        """A heartbeat reply: start looking for a relay if it says so (and nothing is running);
        leave a slot the bootstrap cannot dial either (a relay behind a firewall of its own)."""
        now = asyncio.get_running_loop().time()
        if getattr(reply, "reachable", None) is not False:
            return
        if self.agent is not None:
            if now - self._since > VERDICT_S:  # not a verdict on the address before the slot
                log.warning("the bootstrap cannot reach this node through the relay %s either", self.agent.relay)
                self._failed.add(self.agent.relay)
                self.agent.lost.set()
            return
        relays = [
            r for r in getattr(reply, "relays", None) or [] if relay_dial_address(r, self.bootstrap) not in self._failed
        ]
        if not relays or self._task is not None or now < self._not_before:
            return
        self._task = asyncio.create_task(self._use(relays), name="relaying")

    def to_json(self) -> dict[str, Any] | None:
        """Bytes and round trip through relays, the current one last; None if none was used."""
        used = self.past + ([self.agent.to_json()] if self.agent is not None else [])
        if not used:
            return None
        last = used[-1]
        return {
            **last,
            "bytes_in": sum(u["bytes_in"] for u in used),
            "bytes_out": sum(u["bytes_out"] for u in used),
            "connections": sum(u["connections"] for u in used),
            "relays_used": len(used),
        }

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.agent is not None:
            await self.agent.stop()

    async def _use(self, relays: list[str]) -> None:
        try:
            for relay in relays:
                try:
                    address = relay_dial_address(relay, self.bootstrap)
                    agent = await RelayAgent.create(address, self.local, label=self.label())
                except (RelayRefused, *_IO_ERRORS, ValueError) as exc:
                    log.info("relay %s gave no slot: %s", relay, exc)
                    continue
                self.agent = agent
                log.warning(
                    "peers cannot dial this node: they reach it through the relay %s at %s", address, agent.address
                )
                self._since = asyncio.get_running_loop().time()
                self.readvertise(agent.address, address)
                await agent.lost.wait()
                self.past.append(agent.to_json())
                self.agent = None
                await agent.stop()
                log.warning("the relay %s is gone: advertising %s again", address, self.own)
                self.readvertise(self.own, "")
                return
            log.warning("no relay of %s gave this node a slot; retrying in %g s", relays, RETRY_S)
            self._not_before = asyncio.get_running_loop().time() + RETRY_S
        finally:
            self._task = None
