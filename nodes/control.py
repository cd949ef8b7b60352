"""A node's control plane: join the bootstrap, heartbeat, reconnect, leave.

`ControlClient` is the small reusable piece every node runtime embeds (today the helper
node of `atlas-node join`, later nodes/peer.py). It runs one background task:

    join (retry with backoff) -> every heartbeat_s: heartbeat -> reply hook
         ^                                  | timeout: back off, retry (reconnecting)
         +---- error "unknown_node" --------+ (bootstrap lost us: rejoin, same id)

Failures are values, not crashes: a missing bootstrap makes the node back off with
jittered exponential delays (`backoff_delay`) and keep trying for as long as it runs.
`stop()` sends `leave` (best effort, short deadline) and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

from atlas_p2p.validation import is_int
from nodes.config import NodeConfig, format_address, parse_address
from nodes.reachability import advice
from transport.security import JoinToken, Keypair, load_or_create_keypair

log = logging.getLogger("atlas.node")

IDENTITY_FILE = "node.json"
# Error codes after which retrying the same join cannot help.
_FATAL_JOIN_CODES = frozenset({"bad_address", "bad_request", "bad_schema", "forbidden", "bad_token"})

ReplyHook = Callable[[Any], Awaitable[None] | None]
ProgressFn = Callable[[], dict[str, Any]]


class NodeIdentityError(RuntimeError):
    """The node's --state directory holds something we cannot use."""


class JoinRefused(RuntimeError):
    """The bootstrap refused to admit this node (bad capabilities, not allowed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (1, 2, ...): "equal jitter" exponential backoff.

    d = min(cap, base * 2^(attempt-1)), then a uniform draw in [d/2, d]: the wait doubles
    per failure up to the cap, and the random half keeps many nodes that lost the same
    bootstrap from all knocking at the same instant when it comes back.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, 60))
    return rng.uniform(ceiling / 2.0, ceiling)


def measure_compute_score(duration_s: float = 0.05, size: int = 128) -> float:
    """Rough compute score: GFLOP/s of float32 matrix products (2 n^3 flops each) for ~duration_s."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= duration_s:
            return round(2.0 * size**3 * runs / elapsed / 1e9, 3)


def advertised_address(bound: str, bootstrap: str, advertise: str | None = None) -> str:
    """HOST:PORT peers should dial: `advertise` if given, else the bound address, with a
    wildcard host replaced by this machine's address on the route to the bootstrap."""
    if advertise is not None:
        return advertise
    host, port = parse_address(bound, what="bound address")
    if host not in ("*", "0.0.0.0", "[::]"):
        return bound
    boot_host, boot_port = parse_address(bootstrap, what="bootstrap")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((boot_host, boot_port))  # UDP connect sends nothing; it picks a route
            local = probe.getsockname()[0]
    except OSError:
        local = "127.0.0.1"
    return format_address(local, port)


def node_keys(config: NodeConfig) -> tuple[Keypair | None, JoinToken | None]:
    """This node's keypair (kept in `--state` as node.key / node.key_secret, so a restart is
    the same node; a fresh one per run without a state) and the swarm's join token; (None,
    None) for an insecure node."""
    if config.insecure:
        return None, None
    token = JoinToken.parse(config.token)
    if config.state_dir is None:
        return Keypair.generate(), token
    try:
        return load_or_create_keypair(config.state_dir, "node"), token
    except (OSError, ValueError) as exc:
        raise NodeIdentityError(f"--state: cannot keep this node's key in {config.state_dir}: {exc}") from None


def keyed_client(config: NodeConfig, keypair: Keypair | None, **kwargs: Any) -> Any:
    """An RpcClient for this node: CURVE with `keypair` (the bootstrap's key from the token),
    plain for an insecure node (`keypair` None)."""
    from transport.rpc import RpcClient

    client = RpcClient(f"node-{uuid.uuid4().hex[:12]}", keypair=keypair, **kwargs)
    if keypair is not None:
        client.set_server_key(config.bootstrap, JoinToken.parse(config.token).server_key)
    return client


class SavedIdentity(NamedTuple):
    """What `node.json` keeps: the node's id and the bootstrap state incarnation that gave it."""

    node_id: int
    incarnation: str  # "" in a file written before incarnations: the bootstrap hands out a new id


def load_identity(state_dir: Path | None, bootstrap: str) -> SavedIdentity | None:
    """The node id (and its incarnation) this node had with `bootstrap`, from `state_dir/node.json`,
    or None."""
    if state_dir is None:
        return None
    path = Path(state_dir) / IDENTITY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        node_id, saved_for, incarnation = data["node_id"], data["bootstrap"], data.get("incarnation", "")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NodeIdentityError(f"--state: cannot read {path}: {exc}") from None
    if not is_int(node_id) or node_id < 0:
        raise NodeIdentityError(f"--state: {path} holds a bad node id {node_id!r}")
    if not isinstance(incarnation, str):
        raise NodeIdentityError(f"--state: {path} holds a bad incarnation {incarnation!r:.80}")
    if saved_for != bootstrap:
        log.info("state %s belongs to bootstrap %s, not %s: joining as a new node", path, saved_for, bootstrap)
        return None
    return SavedIdentity(node_id, incarnation)


def save_identity(state_dir: Path | None, bootstrap: str, node_id: int, incarnation: str) -> None:
    """Write `state_dir/node.json` atomically (write a temp file, then rename)."""
    if state_dir is None:
        return
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (IDENTITY_FILE + ".tmp")
    tmp.write_text(json.dumps({"node_id": node_id, "bootstrap": bootstrap, "incarnation": incarnation}))
    tmp.replace(directory / IDENTITY_FILE)


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


class ControlClient:
    """Join / heartbeat / reconnect / leave loop of one node. Build with `await create(...)`."""

    def __init__(
        self,
        config: NodeConfig,
        address: str,
        client: Any,
        *,
        compute_score: float,
        node_id: int | None,
        incarnation: str,
        on_welcome: ReplyHook | None,
        on_heartbeat_reply: ReplyHook | None,
        progress: ProgressFn | None,
        rng: random.Random,
        owns_client: bool,
    ) -> None:
        self.config = config
        self.address = address  # what peers dial to reach this node
        self.via = ""  # the relay `address` goes through ("" when peers dial the node itself)
        self.relay = ""  # the relay this node volunteers (--relay), "" for none
        self.client = client  # transport.rpc.RpcClient used for the bootstrap
        self.compute_score = compute_score
        self.node_id = node_id  # None until the first welcome (unless known from --state)
        self.incarnation = incarnation  # the bootstrap state's incarnation that gave node_id ("": none yet)
        self.welcome: Any = None  # last transport.messages.Welcome
        self.connected = False
        # whether the bootstrap could dial `address` back (heartbeat replies say; None: not known yet)
        self.reachable: bool | None = None
        self.failure: BaseException | None = None  # set when the loop gave up (join refused)
        self._on_welcome = on_welcome
        self._on_heartbeat_reply = on_heartbeat_reply
        self._progress = progress or (lambda: {"state": "waiting"})
        self._rng = rng
        self._owns_client = owns_client
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @classmethod
    async def create(
        cls,
        config: NodeConfig,
        address: str,
        *,
        client: Any = None,
        compute_score: float | None = None,
        on_welcome: ReplyHook | None = None,
        on_heartbeat_reply: ReplyHook | None = None,
        progress: ProgressFn | None = None,
        rng: random.Random | None = None,
        relay: str = "",
    ) -> ControlClient:
        """Start the loop; it joins in the background (see `wait_joined`).

        `address` is this node's dialable HOST:PORT. `client` is an RpcClient to reuse
        (one is made and owned otherwise). `progress()` returns heartbeat fields
        (state, round, base_version, ...). `on_welcome(welcome)` runs after every
        (re)join, `on_heartbeat_reply(reply)` after every answered heartbeat. `relay`: the
        HOST:PORT of the relay this node volunteers.
        """
        saved = load_identity(config.state_dir, config.bootstrap)  # fails before anything opens
        owns = client is None
        if owns:
            client = keyed_client(config, node_keys(config)[0])
        if compute_score is None:
            compute_score = config.compute_score or measure_compute_score()
        self = cls(
            config,
            address,
            client,
            compute_score=compute_score,
            node_id=saved.node_id if saved is not None else None,
            incarnation=saved.incarnation if saved is not None else "",
            on_welcome=on_welcome,
            on_heartbeat_reply=on_heartbeat_reply,
            progress=progress,
            rng=rng or random.Random(),
            owns_client=owns,
        )
        self.relay = relay
        self._task = asyncio.create_task(self._run(), name=f"control:{address}")
        return self

    async def wait_joined(self, timeout: float | None = None) -> Any:
        """Wait for the first welcome; raises the loop's failure (e.g. JoinRefused) if it gave up."""
        waiter = asyncio.create_task(self._joined.wait())
        assert self._task is not None
        try:
            await asyncio.wait({waiter, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if self.failure is not None:
            raise self.failure
        if not self._joined.is_set():
            raise TimeoutError(f"not joined to {self.config.bootstrap} within {timeout} s")
        return self.welcome

    def readvertise(self, address: str, via: str = "") -> None:
        """Peers reach this node at `address` from now on, through the relay `via` ("": directly):
        the loop joins again with it at its next turn (the bootstrap dials the new address back)."""
        parse_address(address, what="address")
        self.address, self.via, self.reachable = address, via, None
        self.welcome = None

    async def wait_done(self) -> None:
        """Return once the loop has ended by itself (it gave up: see `failure`) or was stopped."""
        assert self._task is not None
        await asyncio.wait({self._task})

    @property
    def done(self) -> bool:
        """True once the loop has ended (stopped, or gave up with `failure`)."""
        return self._task is not None and self._task.done()

    async def stop(self, *, leave: bool = True) -> None:
        """Stop heartbeating, send `leave` if joined (best effort), release the client."""
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if leave and self.node_id is not None and self.welcome is not None:
            await self._send_leave()
        if self._owns_client:
            await self.client.stop()

    # --- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        try:
            while True:
                if self.welcome is None:
                    ok = await self._try_join(failures)
                else:
                    ok = await self._try_heartbeat(failures)
                if ok:
                    failures = 0
                    # after a welcome or an answered heartbeat: the next beat; after
                    # "unknown_node" (welcome dropped): rejoin at once
                    await asyncio.sleep(self.welcome.heartbeat_s if self.welcome is not None else 0.0)
                else:
                    failures += 1
                    await asyncio.sleep(
                        backoff_delay(failures, self.config.backoff_base_s, self.config.backoff_cap_s, self._rng)
                    )
        except JoinRefused as exc:
            self.failure = exc
            log.error("bootstrap %s refused this node: %s", self.config.bootstrap, exc.message)
        except Exception as exc:  # a bug: end visibly (the runtime exits non-zero), never silently
            self.failure = exc
            log.exception("control loop failed")

    async def _try_join(self, failures: int) -> bool:
        from transport.messages import Join, Welcome
        from transport.rpc import RpcError, RpcTimeout

        body = Join.offer(
            self.config.capabilities(self.compute_score),
            address=self.address,
            model=self.config.model or "",
            node_id=self.node_id,
            incarnation=self.incarnation if self.node_id is not None else "",
            token="" if self.config.token is None else JoinToken.parse(self.config.token).secret,
            relay=self.relay,
            via=self.via,
        )
        try:
            reply = await self.client.call(self.config.bootstrap, body, timeout=self.config.request_timeout_s)
        except RpcTimeout:
            self._note_unreachable(failures, "join")
            return False
        except RpcError as exc:
            if exc.code == "unauthorized" and self.node_id is not None:
                log.warning(
                    "node id %d belongs to another key at %s: joining as a new node",
                    self.node_id,
                    self.config.bootstrap,
                )
                self.node_id = None
                return False
            if exc.code in _FATAL_JOIN_CODES:
                raise JoinRefused(exc.code, getattr(exc, "message", str(exc))) from None
            log.warning("join refused by %s (%s); retrying", self.config.bootstrap, exc)
            return False
        if not isinstance(reply, Welcome):
            log.warning("join answered with %s instead of welcome; retrying", type(reply).__name__)
            return False
        rejoined = self.node_id == reply.node_id
        self.node_id = reply.node_id
        self.incarnation = reply.incarnation
        self.welcome = reply
        self.connected = True
        save_identity(self.config.state_dir, self.config.bootstrap, reply.node_id, reply.incarnation)
        log.info(
            "%s bootstrap %s as node %d; serving peers on %s (%s, %d bytes, %d bit/s, heartbeat %g s)",
            "rejoined" if rejoined else "joined",
            self.config.bootstrap,
            reply.node_id,
            self.address,
            "trainer" if self.config.has_data else "helper",
            self.config.memory_bytes,
            self.config.bandwidth_bps,
            reply.heartbeat_s,
        )
        if reply.seen_from and reply.seen_from != parse_address(self.address, what="address")[0]:
            log.info("the bootstrap sees this node's connection from %s", reply.seen_from)
        if self.config.model and reply.model and reply.model != self.config.model:
            log.warning("this node runs %r but the swarm runs %r", self.config.model, reply.model)
        self._joined.set()
        await self._run_hook(self._on_welcome, reply)
        return True

    async def _try_heartbeat(self, failures: int) -> bool:
        from transport.messages import Heartbeat
        from transport.rpc import RpcError, RpcTimeout

        assert self.node_id is not None
        try:
            body = Heartbeat(node_id=self.node_id, incarnation=self.incarnation, **self._progress())
        except Exception:  # a bad progress report must not stop the heartbeats
            log.exception("progress() returned bad heartbeat fields; sending a bare heartbeat")
            body = Heartbeat(node_id=self.node_id, state="waiting", incarnation=self.incarnation)
        timeout = min(self.config.request_timeout_s, max(self.welcome.heartbeat_s, 0.5))
        try:
            reply = await self.client.call(self.config.bootstrap, body, timeout=timeout)
        except RpcTimeout:
            self._note_unreachable(failures, "heartbeat")
            return False
        except RpcError as exc:
            if exc.code == "unknown_node":
                log.info("bootstrap %s does not know node %d; joining again", self.config.bootstrap, self.node_id)
                self.welcome = None
                self.connected = False
                return True  # not a failure: rejoin right away
            if exc.code == "unauthorized":  # the id is bound to another key there: never speak for it
                log.warning(
                    "node id %d belongs to another key at %s; joining as a new node",
                    self.node_id,
                    self.config.bootstrap,
                )
                self.welcome, self.node_id = None, None
                self.connected = False
                return True
            log.warning("heartbeat refused (%s)", exc)
            return False
        if not self.connected:
            log.info("reconnected to bootstrap %s", self.config.bootstrap)
            self.connected = True
        self._note_reachable(getattr(reply, "reachable", None))
        await self._run_hook(self._on_heartbeat_reply, reply)
        return True

    def _note_reachable(self, reachable: bool | None) -> None:
        """Say once, when the bootstrap reports it could not dial this node back, what to do."""
        if reachable is False and self.reachable is not False:
            log.warning("%s", advice(self.address, self.welcome.seen_from if self.welcome else ""))
        if reachable is not None:
            self.reachable = reachable

    def _note_unreachable(self, failures: int, what: str) -> None:
        if failures == 0:
            hint = (
                " (a bootstrap with keys never answers an --insecure node)"
                if self.config.insecure
                else " (it must be the bootstrap whose key the token names: a new token after its state was lost)"
            )
            log.warning("bootstrap %s did not answer %s; retrying with backoff%s", self.config.bootstrap, what, hint)
        elif failures % 10 == 0:
            log.info("still no answer from bootstrap %s after %d attempts; retrying", self.config.bootstrap, failures)
        self.connected = False

    async def _run_hook(self, hook: ReplyHook | None, reply: Any) -> None:
        if hook is None:
            return
        try:
            await _maybe_await(hook(reply))
        except asyncio.CancelledError:
            raise
        except Exception:  # the embedding runtime's bug must not stop the heartbeats
            log.exception("control hook %r failed", hook)

    async def _send_leave(self) -> None:
        from transport.messages import Leave
        from transport.rpc import RpcError, RpcTimeout

        try:
            await self.client.call(
                self.config.bootstrap,
                Leave(node_id=self.node_id, reason="shutdown"),
                timeout=self.config.leave_timeout_s,
            )
            log.info("left bootstrap %s", self.config.bootstrap)
        except (RpcTimeout, RpcError) as exc:
            log.warning("leave not acknowledged by %s (%s); exiting anyway", self.config.bootstrap, exc)
