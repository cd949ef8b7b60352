"""Request/response over ZeroMQ asyncio: `RpcServer` (ROUTER) and `RpcClient` (DEALER per peer).

A request is an Envelope sent from a client's DEALER to a server's ROUTER; the server
answers with the same `id`: `ok`, `error` (code, message) or a typed reply. The server
decodes and validates every message before a handler sees it; a bad message or a
failing handler is answered with `error` and counted in `server.stats` under its code,
and the server keeps serving. Requests are identified by (src, id): a retried request
whose reply is still remembered gets that reply again instead of running twice (a reply
too large to keep is answered with error 'duplicate': the request never runs twice).

On the client every call has a deadline (`RpcTimeout`), an `error` reply raises
`RpcError(code, message)`, retries are explicit and reuse the request id (so the server
runs the request once), and the bytes of requests awaiting replies are bounded per peer.
Replies nobody waits for any more are dropped and counted.

Both classes count the encoded bytes of what they send and receive by message type
(`bytes_sent`, `bytes_received`: header plus tensor frames, as handed to or taken from
ZeroMQ), so nobody encodes a message a second time to measure it.

Addresses are "host:port" (tcp). Both classes are built by `await X.create(...)` or used
as `async with X(...)`; `stop()` is idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq

from transport.codec import DEFAULT_MAX_BYTES, DecodeError, EncodeError, decode, encode, peek_id
from transport.limits import LogThrottle, RequestBudget
from transport.link import LinkProfile, LinkShaper
from transport.messages import Envelope, Error, Message, Ok
from transport.pump import SocketPump
from transport.security import AllowList, Keypair, release_server, secure_client, secure_server

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[Message | None]]

FLUSH_RETRY_S = 0.001  # first wait before retrying replies a client's full pipe refused, doubling ...
FLUSH_RETRY_MAX_S = 0.05  # ... up to this while nothing moves


class RpcError(Exception):
    """A call failed with a code: the peer's `error` reply, or a local cause (timeout, stopped)."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class RpcTimeout(RpcError, TimeoutError):
    """No reply before the deadline (after all retries)."""

    def __init__(self, message: str = ""):
        super().__init__("timeout", message)


def tcp_endpoint(address: str) -> str:
    """'host:port' (or 'tcp://host:port') -> 'tcp://host:port'; ValueError names a bad address."""
    if not isinstance(address, str):
        raise ValueError(f"address must be a 'host:port' string, got {address!r}")
    rest = address[len("tcp://") :] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not 'host:port' with a port in 1..65535")
    return f"tcp://{host}:{port}"


def install_uvloop() -> bool:
    """Use uvloop's event loop for asyncio when it is installed; return whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


MANY_SOCKETS = 65_536  # libzmq's default (1,023) is two sockets each for 500 nodes


def allow_many_sockets() -> None:
    """Raise the shared zmq context's socket limit, for a process that hosts many nodes.

    libzmq reads the limit when the context opens its first socket, so call this before any
    (later it changes nothing). 32 gossiping nodes in one process (b2) needed more than the
    default: sends failed with "Too many open files".
    """
    zmq.Context.instance().set(zmq.MAX_SOCKETS, MANY_SOCKETS)


def _new_socket(context: zmq.Context, kind: int, max_bytes: int, hwm: int) -> zmq.Socket:
    """A plain (non-asyncio) socket, whatever context it comes from: SocketPump drives it."""
    sock = zmq.Socket(context, kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def _peer_host(frame: zmq.Frame) -> str:
    """The address the frame's connection came from (libzmq's Peer-Address), "" if unknown."""
    try:
        return str(frame.get("Peer-Address") or "")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return ""


def _frames_nbytes(frames: list) -> int:
    return sum(memoryview(f).nbytes for f in frames)


class ByteCounts(collections.Counter):
    """Encoded bytes by message type (`counts["forward"]`), one direction of one socket."""

    def add(self, msg_type: str, frames: list) -> None:
        self[msg_type] += _frames_nbytes(frames)


# ====================================================================== server


@dataclass(frozen=True)
class RpcServerConfig:
    """Limits of one RpcServer. A client is one connection (one ROUTER identity)."""

    name: str = "server"  # `src` of the replies it sends
    max_bytes: int = DEFAULT_MAX_BYTES  # largest message accepted (decode limit; MAXMSGSIZE per frame)
    max_concurrency: int = 64  # handlers running at once; reading pauses beyond it
    dedup_entries: int = 4096  # requests remembered for duplicate suppression
    dedup_bytes: int = 32 << 20  # total size of the replies kept to replay to duplicates
    dedup_replay_max: int = 1 << 20  # larger replies are not kept (keeping big buffers alive
    # costs ~10% throughput); a duplicate gets error 'duplicate'
    send_timeout_s: float = 10.0  # a client whose queued replies have not moved for this long loses them all
    max_pending_replies: int = 4096  # replies queued for slow clients, all together; beyond, dropped
    max_pending_bytes: int = 256 << 20  # the same in bytes
    client_rate: float | None = 1000.0  # requests per second per client, on average (None: no limit);
    # beyond, error 'rate_limited' and no handler runs
    client_burst: int = 2000  # requests a client may send at once after an idle spell
    client_concurrency: int = 16  # handlers one client may have running at once (at most
    # max_concurrency); its further requests wait in its own queue
    client_queue: int = 256  # bound of each per-client queue (requests waiting for a handler,
    # replies waiting for the client to read); beyond, requests get 'rate_limited', replies are dropped
    client_queue_bytes: int = 64 << 20  # the same in bytes (one larger message may wait alone)
    log_lines: int = 5  # log lines per error code per log_interval_s; the rest are counted
    log_interval_s: float = 10.0
    hwm: int = 1000  # ZeroMQ high-water mark (messages) each way

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_concurrency",
            "hwm",
            "max_pending_replies",
            "max_pending_bytes",
            "client_burst",
            "client_concurrency",
            "client_queue",
            "client_queue_bytes",
            "log_lines",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"RpcServerConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("dedup_entries", "dedup_bytes", "dedup_replay_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"RpcServerConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("send_timeout_s", "log_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RpcServerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.client_rate is not None and not (math.isfinite(self.client_rate) and self.client_rate > 0):
            raise ValueError(f"RpcServerConfig.client_rate must be > 0 or None, got {self.client_rate!r}")


_TOO_BIG = object()  # cache marker: served, but the reply was too large to keep


class _ReplyCache:
    """LRU of encoded replies keyed by (src, id), bounded in entries and bytes.

    A reply larger than `max_reply` is remembered only as served (`_TOO_BIG`), so a
    duplicate is never run twice even when its reply cannot be replayed.
    """

    def __init__(self, max_entries: int, max_bytes: int, max_reply: int):
        self.max_entries, self.max_bytes, self.max_reply = max_entries, max_bytes, max_reply
        self.entries: collections.OrderedDict[tuple[str, int], tuple[object, int]] = collections.OrderedDict()
        self.nbytes = 0

    def get(self, key: tuple[str, int]) -> object | None:
        """(reply type, reply frames), `_TOO_BIG`, or None when this request was not served (or forgotten)."""
        hit = self.entries.get(key)
        if hit is None:
            return None
        self.entries.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[str, int], msg_type: str, frames: list) -> None:
        if self.max_entries == 0:
            return
        size = _frames_nbytes(frames)
        entry = ((msg_type, frames), size) if size <= min(self.max_reply, self.max_bytes) else (_TOO_BIG, 0)
        self.entries[key] = entry
        self.nbytes += entry[1]
        while len(self.entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.nbytes -= dropped


class _Client:
    """What the server holds for one client (ROUTER identity): its running handlers, its
    requests waiting for a handler slot, and its replies waiting for it to read."""

    __slots__ = ("running", "waiting", "waiting_bytes", "outbox", "outbox_bytes", "moved_at")

    def __init__(self) -> None:
        self.running = 0
        # deques made on first use (most clients never queue): () until then
        self.waiting: collections.deque[tuple[Envelope, int]] | tuple = ()
        self.waiting_bytes = 0
        self.outbox: collections.deque[tuple[list, int]] | tuple = ()  # ([identity, *frames], nbytes)
        self.outbox_bytes = 0
        self.moved_at = 0.0  # loop time the outbox last moved (or started)

    def idle(self) -> bool:
        return not (self.running or self.waiting or self.outbox)


class RpcServer:
    """A ROUTER that decodes requests, runs `handlers[type](env)` and answers with the same id.

    A handler returns the reply body (None means `ok`) or raises `RpcError(code, message)`
    to answer with that error; any other exception is answered as `handler_error`.
    `stats` counts requests, replies, duplicates and every error code sent.

    Fairness (limits in RpcServerConfig): each client has a request budget (token bucket;
    beyond it, error `rate_limited` and no handler runs), a cap on its handlers running at
    once (further requests wait in its own bounded queue), and its own bounded queue of
    replies. A reply goes to ZeroMQ at once unless that client's pipe is full; then it
    waits in the client's queue (full: the newest is dropped, `reply_dropped`), and a
    client whose queue does not move for `send_timeout_s` loses it whole (`send_timeout`).
    A handler is done when its reply is queued, so a client that does not read never
    holds a handler slot, and replies to other clients never wait behind its queue.
    Error replies are logged at most `log_lines` per code per `log_interval_s`.
    With `keypair` the socket speaks CURVE and admits only clients on `allow`
    (None: any client that has a keypair); see transport/security.py.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | str = 0,
        handlers: dict[str, Handler] | None = None,
        *,
        config: RpcServerConfig | None = None,
        link: LinkProfile | None = None,
        context: zmq.Context | None = None,
        keypair: Keypair | None = None,
        allow: AllowList | None = None,
    ):
        if allow is not None and keypair is None:
            raise ValueError("RpcServer allow-list needs a keypair (CURVE) to be enforced")
        self.host, self._port_request = host, port
        self.keypair, self.allow = keypair, allow
        self._zap_domain: str | None = None
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.config = config or RpcServerConfig()
        self.stats: collections.Counter[str] = collections.Counter()
        self.bytes_sent = ByteCounts()  # replies, by type (module doc)
        self.bytes_received = ByteCounts()  # requests, by type
        self.requests_by_type: collections.Counter[str] = collections.Counter()  # decoded requests, by type
        self._shaper = LinkShaper(link) if link is not None else None
        self._context = context or zmq.Context.instance()
        self._cache = _ReplyCache(self.config.dedup_entries, self.config.dedup_bytes, self.config.dedup_replay_max)
        self._running: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._sock: zmq.Socket | None = None
        self._pump: SocketPump | None = None
        self._active = 0  # handlers running now (reading pauses at max_concurrency)
        self._clients: dict[bytes, _Client] = {}  # clients with handlers running or messages queued
        self._client_cap = min(self.config.client_concurrency, self.config.max_concurrency)
        rate = self.config.client_rate
        self._budget = RequestBudget(rate, self.config.client_burst) if rate is not None else None
        self._pending_replies = 0  # replies in all outboxes, and their bytes
        self._pending_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_s = FLUSH_RETRY_S
        self._log_throttle = LogThrottle(self.config.log_lines, self.config.log_interval_s)
        self._log_timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self.port: int | None = None

    @classmethod
    async def create(
        cls, host: str = "127.0.0.1", port: int | str = 0, handlers: dict[str, Handler] | None = None, **kwargs
    ) -> RpcServer:
        server = cls(host, port, handlers, **kwargs)
        await server.start()
        return server

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        """'host:port' to give to peers (a wildcard bind is reported as 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("*", "0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def register(self, msg_type: str, handler: Handler) -> None:
        self.handlers[msg_type] = handler

    async def start(self) -> None:
        if self._sock is not None:
            raise RuntimeError("RpcServer already started")
        sock = _new_socket(self._context, zmq.ROUTER, self.config.max_bytes, self.config.hwm)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self.keypair is not None:
                self._zap_domain = secure_server(sock, self.keypair, self.allow or AllowList(allow_any=True))
            if self._port_request in (0, "0", "random", None):
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                port = int(self._port_request)
                sock.bind(f"tcp://{self.host}:{port}")
                self.port = port
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock
        self._pump = SocketPump(sock, self._on_message)
        log.debug("rpc server listening on %s", self.address)

    async def stop(self) -> None:
        """Stop reading, cancel running handlers, close the socket. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._pump is not None:
            self._pump.close()
        for timer in (self._flush_timer, self._log_timer):
            if timer is not None:
                timer.cancel()
        self._log_suppressed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._clients.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._zap_domain is not None:
            release_server(self._context, self._zap_domain)

    # ---- the receive loop: decode, deduplicate, dispatch

    def _on_message(self, parts: list) -> None:
        """One multipart message from the ROUTER: [identity, header, tensor frames...]."""
        if len(parts) < 2:
            self.stats["bad_header"] += 1  # an identity with no message: nothing to answer
            return
        identity = parts[0].bytes
        self.stats["requests"] += 1
        if self._budget is not None and not self._budget.admit(identity, self._pump.loop.time()):
            detail = f"over {self.config.client_rate:g} requests/s (burst {self.config.client_burst}) from this client"
            self._reply_error(identity, peek_id(parts[1:]) or 0, "rate_limited", detail)
            return
        try:
            env = decode(parts[1:], max_bytes=self.config.max_bytes)
        except DecodeError as exc:
            self._reply_error(identity, exc.msg_id or 0, exc.code, exc.detail)
            return
        if self.keypair is not None:  # the key libzmq authenticated, not one the sender states
            env = dataclasses.replace(env, peer_key=parts[1].get("User-Id"))
        host = _peer_host(parts[1])
        if host:
            env = dataclasses.replace(env, peer_host=host)
        self.bytes_received.add(env.type, parts[1:])
        self.requests_by_type[env.type] += 1
        key = (env.peer_key + env.src, env.id)  # a key is 40 characters or "": no two pairs collide
        cached = self._cache.get(key)
        if cached is _TOO_BIG:
            self.stats["duplicates"] += 1
            self._reply_error(identity, env.id, "duplicate", "request already served; its reply was too large to keep")
            return
        if cached is not None:
            self.stats["duplicates"] += 1
            self._spawn_reply(identity, *cached)
            return
        if key in self._running:
            self.stats["duplicates"] += 1  # the reply on its way answers this copy too
            return
        client = self._clients.get(identity)
        if client is None:
            client = self._clients[identity] = _Client()
        if client.running < self._client_cap:
            self._running.add(key)
            self._start_handler(identity, client, env)
            return
        nbytes = _frames_nbytes(parts[1:])
        if len(client.waiting) >= self.config.client_queue or (
            client.waiting and client.waiting_bytes + nbytes > self.config.client_queue_bytes
        ):
            detail = f"{client.running} requests of this client running and {len(client.waiting)} waiting"
            self._reply_error(identity, env.id, "rate_limited", detail)
            return
        self._running.add(key)
        if not client.waiting:
            client.waiting = collections.deque()
        client.waiting.append((env, nbytes))
        client.waiting_bytes += nbytes

    def _start_handler(self, identity: bytes, client: _Client, env: Envelope) -> None:
        client.running += 1
        self._active += 1
        if self._active >= self.config.max_concurrency:
            self._pump.pause()
        task = asyncio.ensure_future(self._handle(identity, env))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._handler_done(t, identity, client))

    def _handler_done(self, task: asyncio.Task, identity: bytes, client: _Client) -> None:
        """A handler finished: its slot goes to that client's next waiting request, if any."""
        self._tasks.discard(task)
        client.running -= 1
        self._active -= 1
        if self._stopped:
            return
        if client.waiting:
            env, nbytes = client.waiting.popleft()
            client.waiting_bytes -= nbytes
            self._start_handler(identity, client, env)
        else:
            self._forget_if_idle(identity, client)
        if self._active < self.config.max_concurrency:
            self._pump.resume()

    def _reply_error(self, identity: bytes, msg_id: int, code: str, detail: str) -> None:
        self.stats[code] += 1
        self._log_limited(code, logging.INFO, "answering error %s: %s", code, detail[:200])
        frames = encode(Envelope.of(Error(code=code, message=detail[:1000]), msg_id, self.config.name))
        self._spawn_reply(identity, Error.TYPE, frames)

    def _log_limited(self, key: str, level: int, fmt: str, *args: object, exc_info: bool = False) -> None:
        """Log one line about a refused message, at most `log_lines` per key per interval."""
        if self._log_throttle.allow(key):
            log.log(level, "rpc server %s: " + fmt, self.address, *args, exc_info=exc_info)
        elif self._log_timer is None and not self._stopped:
            self._log_timer = self._pump.loop.call_later(self.config.log_interval_s, self._log_suppressed)

    def _log_suppressed(self) -> None:
        """One line per key whose log lines were held back in an interval that has ended (all, once stopped)."""
        self._log_timer = None
        for code, count in sorted(self._log_throttle.suppressed(everything=self._stopped).items()):
            log.info(
                "rpc server %s: %d more '%s' lines not logged (at most %d per %g s)",
                self.address,
                count,
                code,
                self.config.log_lines,
                self.config.log_interval_s,
            )
        if self._log_throttle.holding() and not self._stopped:
            self._log_timer = self._pump.loop.call_later(self.config.log_interval_s, self._log_suppressed)

    def _spawn_reply(self, identity: bytes, msg_type: str, frames: list) -> None:
        """Send a reply that needs no handler (an error, a replayed duplicate)."""
        if self._shaper is None:
            self._reply(identity, msg_type, frames)
        elif len(self._tasks) - self._active >= self.config.max_pending_replies:
            self.stats["reply_dropped"] += 1  # a flood already holds that many replies on the emulated link
        else:
            task = asyncio.ensure_future(self._send(identity, msg_type, frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, identity: bytes, env: Envelope) -> None:
        key = (env.peer_key + env.src, env.id)
        try:
            reply = await self._run_handler(env)
            try:
                frames = encode(Envelope.of(reply, env.id, self.config.name))
            except EncodeError as exc:
                reply = Error(code="handler_error", message=f"reply to {env.type} cannot be encoded: {exc}")
                frames = encode(Envelope.of(reply, env.id, self.config.name))
            if isinstance(reply, Error):
                self.stats[reply.code] += 1
            self._cache.put(key, reply.TYPE, frames)
        finally:
            self._running.discard(key)
        if self._shaper is None:
            self._reply(identity, reply.TYPE, frames)
        else:
            await self._send(identity, reply.TYPE, frames)

    async def _run_handler(self, env: Envelope) -> Message:
        handler = self.handlers.get(env.type)
        if handler is None:
            return Error(code="no_handler", message=f"this node does not serve {env.type!r}")
        try:
            reply = await handler(env)
        except RpcError as exc:
            return Error(code=exc.code, message=exc.message)
        except Exception as exc:  # a handler bug must not take the server down
            self._log_limited(f"handler {env.type}", logging.ERROR, "handler for %s failed", env.type, exc_info=True)
            return Error(code="handler_error", message=f"{type(exc).__name__}: {exc}"[:1000])
        if reply is None:
            return Ok()
        if not isinstance(reply, Message):
            return Error(code="handler_error", message=f"handler for {env.type} returned {type(reply).__name__}")
        return reply

    async def _send(self, identity: bytes, msg_type: str, frames: list) -> None:
        """A reply through the emulated link (LinkProfile): held as the link would, then `_reply`."""
        if not await self._shaper.admit(_frames_nbytes(frames)):
            self.bytes_sent.add(msg_type, frames)
            self.stats["link_dropped"] += 1
            return
        self._reply(identity, msg_type, frames)

    # ---- the send path: at once, or through the client's own queue

    def _reply(self, identity: bytes, msg_type: str, frames: list) -> None:
        """Hand a reply to ZeroMQ now (zero-copy) if nothing is queued for this client and its
        pipe has room; otherwise queue it behind the client's earlier replies, within bounds."""
        self.bytes_sent.add(msg_type, frames)
        message = [identity, *frames]
        client = self._clients.get(identity)
        if client is None or not client.outbox:
            try:
                if self._pump.send_now(message):
                    self.stats["replies"] += 1
                    return
            except zmq.ZMQError as exc:  # EHOSTUNREACH (ROUTER_MANDATORY): the caller went away
                self.stats["unroutable"] += 1
                log.debug("rpc server %s: reply not routable: %s", self.address, exc)
                return
            if client is None:
                client = self._clients[identity] = _Client()
            client.moved_at = self._pump.loop.time()
        nbytes = _frames_nbytes(frames)
        cfg = self.config
        if client.outbox and (
            len(client.outbox) >= cfg.client_queue or client.outbox_bytes + nbytes > cfg.client_queue_bytes
        ):
            self.stats["reply_dropped"] += 1  # this client's queue is full: drop the newest
            return
        if self._pending_replies >= cfg.max_pending_replies or self._pending_bytes + nbytes > cfg.max_pending_bytes:
            self.stats["reply_dropped"] += 1  # all queues together are full
            self._forget_if_idle(identity, client)
            return
        if not client.outbox:
            client.outbox = collections.deque()
        client.outbox.append((message, nbytes))
        client.outbox_bytes += nbytes
        self._pending_replies += 1
        self._pending_bytes += nbytes
        if self._flush_timer is None:
            self._flush_s = FLUSH_RETRY_S
            self._flush_timer = self._pump.loop.call_later(self._flush_s, self._flush)

    def _flush(self) -> None:
        """Retry every queued reply, client by client; drop a client's queue that has not moved
        for send_timeout_s (or whose client is gone). ZeroMQ does not say which pipe has room
        again, so this polls, backing off while nothing moves."""
        self._flush_timer = None
        if self._stopped:
            return
        now = self._pump.loop.time()
        moved = False
        for identity, client in list(self._clients.items()):
            while client.outbox:
                message, nbytes = client.outbox[0]
                try:
                    if not self._pump.send_now(message):
                        break
                except zmq.ZMQError as exc:
                    self.stats["unroutable"] += len(client.outbox)
                    log.debug("rpc server %s: queued replies not routable: %s", self.address, exc)
                    self._drop_outbox(client)
                    break
                client.outbox.popleft()
                client.outbox_bytes -= nbytes
                self._pending_replies -= 1
                self._pending_bytes -= nbytes
                client.moved_at = now
                moved = True
                self.stats["replies"] += 1
            if client.outbox and now - client.moved_at >= self.config.send_timeout_s:
                self.stats["send_timeout"] += len(client.outbox)
                self.stats["clients_dropped"] += 1
                self._log_limited(
                    "send_timeout",
                    logging.INFO,
                    "dropped %d replies to a client that read none for %g s",
                    len(client.outbox),
                    self.config.send_timeout_s,
                )
                self._drop_outbox(client)
            self._forget_if_idle(identity, client)
        if self._pending_replies:
            self._flush_s = FLUSH_RETRY_S if moved else min(2 * self._flush_s, FLUSH_RETRY_MAX_S)
            self._flush_timer = self._pump.loop.call_later(self._flush_s, self._flush)

    def _drop_outbox(self, client: _Client) -> None:
        self._pending_replies -= len(client.outbox)
        self._pending_bytes -= client.outbox_bytes
        client.outbox.clear()
        client.outbox_bytes = 0

    def _forget_if_idle(self, identity: bytes, client: _Client) -> None:
        if client.idle() and self._clients.get(identity) is client:
            del self._clients[identity]


# ====================================================================== client


@dataclass(frozen=True)
class RpcClientConfig:
    """Limits of one RpcClient."""

    max_bytes: int = DEFAULT_MAX_BYTES  # largest reply accepted
    inflight_bytes: int = 64 << 20  # request bytes awaiting replies, per peer (one larger request may go alone)
    hwm: int = 1000  # ZeroMQ high-water mark (messages) each way

    def __post_init__(self) -> None:
        for name in ("max_bytes", "inflight_bytes", "hwm"):
            if getattr(self, name) < 1:
                raise ValueError(f"RpcClientConfig.{name} must be >= 1, got {getattr(self, name)!r}")


class _Peer:
    """One remote address: its DEALER and pump, in-flight byte budget and link shaper."""

    def __init__(self, address: str, sock: zmq.Socket, shaper: LinkShaper | None):
        self.address, self.sock, self.shaper = address, sock, shaper
        self.inflight = 0
        self.waiters: collections.deque[tuple[asyncio.Future, int, int]] = collections.deque()
        self.pump: SocketPump | None = None

    async def reserve(self, nbytes: int, limit: int) -> None:
        """Wait (first come, first served) until `nbytes` more fit under `limit`, then take them.

        A request larger than the whole limit goes when nothing else is in flight.
        """
        if not self.waiters and (self.inflight == 0 or self.inflight + nbytes <= limit):
            self.inflight += nbytes  # fast path: no queue, room now
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (turn, nbytes, limit)
        self.waiters.append(entry)
        try:
            await turn
        except BaseException:
            if entry in self.waiters:
                self.waiters.remove(entry)
            elif turn.done() and not turn.cancelled():
                self.release(nbytes)  # granted just as we were cancelled: give it back
            raise

    def release(self, nbytes: int) -> None:
        self.inflight -= nbytes
        while self.waiters:
            turn, wanted, limit = self.waiters[0]
            if turn.done():
                self.waiters.popleft()
                continue
            if not (self.inflight == 0 or self.inflight + wanted <= limit):
                break
            self.waiters.popleft()
            self.inflight += wanted
            turn.set_result(None)


class RpcClient:
    """Calls peers: `await client.call("host:port", body, timeout=5.0, retries=0) -> reply body`.

    `src` names this client in every request (with the id it makes requests unique, so
    give each node its own). Ids start at a random 48-bit offset, so a restarted node
    reusing its name does not collide with replies a server still remembers.
    With `keypair`, every connection speaks CURVE and needs the server's public key
    first (`set_server_key`); a call to an address without one raises RpcError('no_server_key').
    """

    def __init__(
        self,
        src: str,
        *,
        config: RpcClientConfig | None = None,
        link: LinkProfile | None = None,
        context: zmq.Context | None = None,
        keypair: Keypair | None = None,
    ):
        if not isinstance(src, str) or not src:
            raise ValueError(f"RpcClient src must be a non-empty str, got {src!r}")
        self.src = src
        self.config = config or RpcClientConfig()
        self.stats: collections.Counter[str] = collections.Counter()
        self.bytes_sent = ByteCounts()  # requests (each attempt), by type (module doc)
        self.bytes_received = ByteCounts()  # replies, by type
        self._link = link
        self._uplink = LinkShaper(link) if link is not None else None
        self._links: dict[str, LinkShaper] = {}
        self._context = context or zmq.Context.instance()
        self._peers: dict[str, _Peer] = {}
        self._pending: dict[int, tuple[asyncio.Future, _Peer]] = {}
        self._ids = itertools.count(secrets.randbits(48) + 1)
        self._stopped = False
        self.keypair = keypair
        self._server_keys: dict[str, bytes] = {}

    @classmethod
    async def create(cls, src: str, **kwargs) -> RpcClient:
        return cls(src, **kwargs)

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def set_server_key(self, address: str, public_key: bytes | str | None) -> None:
        """Talk CURVE to `address`, whose public key this is (None: plain again).

        A connection already open under another key is closed (its waiting calls fail with
        RpcError('disconnected')): another node now serves that address.
        """
        endpoint = tcp_endpoint(address)
        key = None if public_key is None else public_key.encode("ascii") if isinstance(public_key, str) else public_key
        if self._server_keys.get(endpoint) == key:
            return
        if key is None:
            self._server_keys.pop(endpoint, None)
        else:
            self._server_keys[endpoint] = key
        peer = self._peers.pop(endpoint, None)
        if peer is not None:
            self._close_peer(peer, "disconnected")

    def set_link(self, address: str, profile: LinkProfile | None) -> None:
        """Emulate a specific link to `address` (None: back to the client's default link)."""
        endpoint = tcp_endpoint(address)
        if profile is None:
            self._links.pop(endpoint, None)
        else:
            self._links[endpoint] = LinkShaper(profile)
        if endpoint in self._peers:
            self._peers[endpoint].shaper = self._links.get(endpoint, self._uplink)

    async def call(
        self, address: str, body: Message, timeout: float = 5.0, retries: int = 0, expect: type[Message] | None = None
    ) -> Message:
        """Send `body` to `address` and return the reply body.

        Each attempt has `timeout` seconds (queueing for the in-flight budget, emulated
        link delay and the reply all count); `retries` more attempts resend the same
        request id. Raises RpcTimeout, RpcError(code) for an `error` reply,
        RpcError('bad_reply') when `expect` is given and the reply is another type, and
        RpcError('no_socket') when no socket can be opened (the context's limit, no file descriptors).
        """
        if self._stopped:
            raise RpcError("stopped", "RpcClient is stopped")
        if not timeout > 0 or retries < 0:
            raise ValueError(f"call needs timeout > 0 and retries >= 0, got {timeout!r}, {retries!r}")
        msg_id = next(self._ids)
        frames = encode(Envelope.of(body, msg_id, self.src))
        nbytes = _frames_nbytes(frames)
        peer = self._peer(address)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (future, peer)
        reserved = False
        self.stats["calls"] += 1
        try:
            for attempt in range(retries + 1):
                try:
                    async with asyncio.timeout(timeout):
                        if not reserved:
                            await peer.reserve(nbytes, self.config.inflight_bytes)
                            reserved = True
                        await self._send(peer, type(body).TYPE, frames)
                        reply = await asyncio.shield(future)
                    break
                except TimeoutError:
                    if attempt == retries:
                        self.stats["timeouts"] += 1
                        raise RpcTimeout(
                            f"{type(body).TYPE} to {address}: no reply in {timeout}s after {retries + 1} attempt(s)"
                        ) from None
                    self.stats["retries"] += 1
        finally:
            self._pending.pop(msg_id, None)
            if reserved:
                peer.release(nbytes)
            if not future.done():
                future.cancel()
        if isinstance(reply, Error):
            raise RpcError(reply.code, reply.message)
        if expect is not None and not isinstance(reply, expect):
            raise RpcError("bad_reply", f"{type(body).TYPE} expected {expect.TYPE}, got {type(reply).TYPE}")
        return reply

    async def forget(self, address: str) -> None:
        """Close the connection to `address`; calls waiting on it fail with RpcError('disconnected')."""
        peer = self._peers.pop(tcp_endpoint(address), None)
        if peer is not None:
            self._close_peer(peer, "disconnected")

    async def stop(self) -> None:
        """Close every connection; waiting calls fail with RpcError('stopped'). Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            self._close_peer(peer, "stopped")

    # ---- internals

    def _peer(self, address: str) -> _Peer:
        endpoint = tcp_endpoint(address)
        peer = self._peers.get(endpoint)
        if peer is None:
            server_key = self._server_keys.get(endpoint)
            if self.keypair is not None and server_key is None:
                raise RpcError("no_server_key", f"CURVE is on and the public key of {address} is unknown")
            try:
                sock = _new_socket(self._context, zmq.DEALER, self.config.max_bytes, self.config.hwm)
            except zmq.ZMQError as exc:  # e.g. the context's socket limit: a failed call, like any other
                self.stats["no_socket"] += 1
                raise RpcError("no_socket", f"cannot open a socket to {address}: {exc}") from None
            try:
                if server_key is not None:
                    secure_client(sock, self.keypair or Keypair.generate(), server_key)
                sock.connect(endpoint)
            except BaseException:
                sock.close(linger=0)
                raise
            peer = _Peer(endpoint, sock, self._links.get(endpoint, self._uplink))
            peer.pump = SocketPump(sock, lambda parts, peer=peer: self._on_reply(peer, parts))
            self._peers[endpoint] = peer
        return peer

    def _close_peer(self, peer: _Peer, reason: str) -> None:
        if peer.pump is not None:
            peer.pump.close()
        peer.sock.close(linger=0)
        for future, owner in list(self._pending.values()):
            if owner is peer and not future.done():
                future.set_exception(RpcError(reason, f"connection to {peer.address} closed"))

    async def _send(self, peer: _Peer, msg_type: str, frames: list) -> None:
        self.bytes_sent.add(msg_type, frames)
        if peer.shaper is not None and not await peer.shaper.admit(_frames_nbytes(frames)):
            self.stats["link_dropped"] += 1
            return
        await peer.pump.send(frames)
        self.stats["sent"] += 1

    def _on_reply(self, peer: _Peer, parts: list) -> None:
        try:
            env = decode(parts, max_bytes=self.config.max_bytes)
        except DecodeError as exc:
            self.stats["bad_reply"] += 1
            waiting = self._pending.get(exc.msg_id) if exc.msg_id is not None else None
            if waiting is not None and waiting[1] is peer and not waiting[0].done():
                waiting[0].set_exception(RpcError("bad_reply", f"{exc.code}: {exc.detail}"))
            return
        self.bytes_received.add(env.type, parts)
        waiting = self._pending.get(env.id)
        if waiting is None or waiting[1] is not peer or waiting[0].done():
            self.stats["late_replies"] += 1
            return
        waiting[0].set_result(env.body)
