"""The relay's control frames (issue 13), two pure functions and the slot arithmetic.

A node nobody can dial (behind a NAT) keeps one outbound TCP connection to a relay, a
reachable peer or the bootstrap started with `--relay PORT`. The relay listens for the
swarm on one port per relayed node (a slot) and, for every connection a peer opens there,
asks the relayed node to dial back a data connection, then splices the two byte for byte.
The ZeroMQ session, CURVE handshake included, runs end to end through the splice: the relay
carries ciphertext it can neither read nor forge (nodes/relay.py).

On the control port each connection starts with one frame: 4-byte big-endian length, then a
msgpack map {"t": kind, ...}:

    hello {node}     relayed node -> relay: give me a slot (node: a label for logs)
    slot {address}   relay -> node: peers reach you at this HOST:PORT
    refused {reason} relay -> node: no slot (full, bad hello); the relay closes
    open {conn}      relay -> node: a peer connected to your slot, dial back for it
    data {conn}      node -> relay, first frame of a new connection: this one carries `conn`;
                     raw bytes follow
    ping {at}        node -> relay: measure the round trip; answered by pong {at}
    pong {at}

`decode_frame` trusts nothing: a bad frame raises `RelayFrameError` and the shell closes the
connection that sent it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_FRAME_BYTES = 1024  # every control frame is a few dozen bytes
LENGTH = struct.Struct(">I")
KINDS = ("hello", "slot", "refused", "open", "data", "ping", "pong")
_TEXT_MAX = 256
_FIELDS = {  # kind -> its one field and the field's type
    "hello": ("node", str),
    "slot": ("address", str),
    "refused": ("reason", str),
    "open": ("conn", int),
    "data": ("conn", int),
    "ping": ("at", float),
    "pong": ("at", float),
}
CONN_LIMIT = (1 << 63) - 1


class RelayFrameError(ValueError):
    """A control frame that is not one of KINDS with its field well formed."""


@dataclass(frozen=True)
class Frame:
    kind: str
    value: Any  # the kind's one field (see _FIELDS)


def encode_frame(kind: str, value: Any) -> bytes:
    """Length-prefixed msgpack of {"t": kind, field: value}; ValueError on a bad kind or value."""
    frame = _checked(kind, value, ValueError)
    body = msgpack.packb({"t": frame.kind, _FIELDS[kind][0]: frame.value})
    return LENGTH.pack(len(body)) + body


def frame_length(prefix: bytes) -> int:
    """The body length a 4-byte prefix announces; RelayFrameError beyond MAX_FRAME_BYTES."""
    if len(prefix) != LENGTH.size:
        raise RelayFrameError(f"a length prefix is {LENGTH.size} bytes, got {len(prefix)}")
    (n,) = LENGTH.unpack(prefix)
    if not 0 < n <= MAX_FRAME_BYTES:
        raise RelayFrameError(f"frame of {n} bytes (a control frame is 1..{MAX_FRAME_BYTES})")
    return n


def decode_frame(body: bytes) -> Frame:
    """The frame a body (after its length prefix) holds; RelayFrameError on anything else."""
    if len(body) > MAX_FRAME_BYTES:
        raise RelayFrameError(f"frame of {len(body)} bytes (at most {MAX_FRAME_BYTES})")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
        raise RelayFrameError(f"not msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise RelayFrameError("a control frame is a map with a string 't'")
    kind = obj["t"]
    if kind not in _FIELDS:
        raise RelayFrameError(f"unknown frame kind {kind[:32]!r}")
    name = _FIELDS[kind][0]
    if set(obj) != {"t", name}:
        raise RelayFrameError(f"a {kind} frame has exactly the keys t and {name}")
    return _checked(kind, obj[name], RelayFrameError)


def _checked(kind: str, value: Any, error: type[ValueError]) -> Frame:
    if kind not in _FIELDS:
        raise error(f"unknown frame kind {kind!r}")
    name, kind_type = _FIELDS[kind]
    if kind_type is str:
        if not isinstance(value, str) or len(value) > _TEXT_MAX:
            raise error(f"{kind}.{name} must be a string of at most {_TEXT_MAX} characters")
    elif kind_type is int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= CONN_LIMIT:
            raise error(f"{kind}.{name} must be an integer in 0..2**63-1")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise error(f"{kind}.{name} must be a finite number")
        value = float(value)
    return Frame(kind, value)


def slot_ports(port: int, slots: int) -> list[int]:
    """The ports relayed nodes are reached on: the `slots` ports after the control port (the
    firewall opens port..port+slots); with port 0 (tests) each slot takes any free port (0)."""
    if not 0 <= port < 65536:
        raise ValueError(f"relay port must be in 0..65535, got {port!r}")
    if slots < 1:
        raise ValueError(f"relay slots must be >= 1, got {slots!r}")
    if port == 0:
        return [0] * slots
    if port + slots > 65535:
        raise ValueError(f"relay port {port} + {slots} slots runs past 65535")
    return [port + 1 + i for i in range(slots)]


def relay_dial_address(relay: str, known: str) -> str:
    """An address whose host is left out (":PORT") is on the host of `known`, an address the
    node already dials: the bootstrap's own relay is named so (on the bootstrap's host), and so
    are its slots (on the relay's host). A bootstrap bound to every interface does not know
    which of its addresses the node reaches; the node does."""
    if relay.startswith(":"):
        host = known[len("tcp://") :] if known.startswith("tcp://") else known
        return f"{host.rpartition(':')[0]}{relay}"
    return relay
