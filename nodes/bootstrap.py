"""The bootstrap service: the registry behind a ZeroMQ RpcServer, plus the liveness sweep.

It answers `join` (-> `welcome`), `heartbeat`, `leave` (-> `ok`) and `peers`
(-> `peer_list`). The RpcServer decodes and validates every request before a handler
runs; a handler refuses nonsense (unknown node, undialable address) with an `error`
reply. Every error code sent is counted in `stats`, and nothing a peer sends can stop
the service. The peer table lives in SQLite under `state_dir` (WAL); the directory is
locked so two bootstraps cannot share it, and `bootstrap.json` there tells tools which
address the running bootstrap bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nodes.config import BootstrapConfig, parse_address
from nodes.peer_table import PeerTable, PeerTableError, open_peer_table
from nodes.registry import Registry, RequestError

log = logging.getLogger("atlas.bootstrap")

INFO_FILE = "bootstrap.json"
LOCK_FILE = "bootstrap.lock"
MAX_REQUEST_BYTES = 4 << 20  # control messages only: capabilities, fingerprints, reports


def _lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive flock on state_dir/bootstrap.lock (released by the kernel on exit)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - kept open while running
    except OSError as exc:
        raise PeerTableError(f"cannot use state dir {state_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise PeerTableError(f"state dir {state_dir} is in use by another bootstrap (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def read_bootstrap_info(state_dir: Path | str) -> dict[str, Any] | None:
    """{"address", "pid", "started_at"} written by the running bootstrap, or None."""
    try:
        return json.loads((Path(state_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


class Bootstrap:
    """The running service. Build with `await Bootstrap.create(config)`; `stop()` is idempotent."""

    def __init__(self, config: BootstrapConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.registry: Registry | None = None
        self.server: Any = None  # transport.rpc.RpcServer
        self.address: str = ""
        self._table: PeerTable | None = None
        self._lock: IO[str] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = False

    @classmethod
    async def create(cls, config: BootstrapConfig, *, clock: Callable[[], float] = time.time) -> Bootstrap:
        """Open (and lock) the state, bind the server, start the liveness sweep."""
        self = cls(config, clock)
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        from transport.rpc import RpcServer, RpcServerConfig

        if self.config.state_dir is not None:
            self._lock = _lock_state_dir(self.config.state_dir)
        self._table = open_peer_table(self.config.state_dir)
        self.registry = Registry(self._table, self.config, now=self.clock())
        host, port = parse_address(self.config.bind, allow_port_zero=True, what="bind")
        handlers = {
            "join": self.rpc_join,
            "heartbeat": self.rpc_heartbeat,
            "leave": self.rpc_leave,
            "peers": self.rpc_peers,
        }
        self.server = await RpcServer.create(
            host, port, handlers, config=RpcServerConfig(name="bootstrap", max_bytes=MAX_REQUEST_BYTES)
        )
        self.address = self.server.address
        if self.config.state_dir is not None:
            info = {"address": self.address, "pid": os.getpid(), "started_at": self.registry.started_at}
            tmp = self.config.state_dir / (INFO_FILE + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self.config.state_dir / INFO_FILE)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="bootstrap-sweep")
        known = self._table.rows()
        log.info(
            "bootstrap listening on %s (state %s, %d known peers, heartbeat %g s, suspect %g s, dead %g s)",
            self.address, self.config.state_dir or "in memory", len(known),
            self.config.heartbeat_s, self.config.suspect_after_s, self.config.dead_after_s,
        )

    async def stop(self) -> None:
        """Stop sweeping and serving, close the table, release the state lock."""
        if self._stopped:
            return
        self._stopped = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.server is not None:
            await self.server.stop()
        if self._table is not None:
            self._table.close()
        if self._lock is not None:
            self._lock.close()

    @property
    def stats(self) -> Counter[str]:
        """Requests, replies and every error code answered (from the RpcServer)."""
        return self.server.stats if self.server is not None else Counter()

    # --- handlers (bodies are already schema-checked by the codec) ------------------------

    async def rpc_join(self, env: Any) -> Any:
        from transport.messages import Welcome

        body = env.body
        result = self._call(
            self.registry.join,
            address=body.address,
            memory_mb=body.memory_mb,
            bandwidth_mbps=body.bandwidth_mbps,
            compute_score=body.compute_score,
            has_data=body.has_data,
            n_samples=body.n_samples,
            model=body.model or None,
            public_key=body.public_key,
            node_id=body.node_id,
            client=env.src,
            now=self.clock(),
        )
        return Welcome(
            node_id=result.node_id,
            model=self.config.model or "",
            fingerprint_seed=self.registry.fingerprint_seed,
            heartbeat_s=self.config.heartbeat_s,
        )

    async def rpc_heartbeat(self, env: Any) -> None:
        body = env.body
        self._call(
            self.registry.heartbeat, body.node_id, now=self.clock(),
            state=body.state, round=body.round, base_version=body.base_version,
        )

    async def rpc_leave(self, env: Any) -> None:
        self._call(self.registry.leave, env.body.node_id, now=self.clock())

    async def rpc_peers(self, env: Any) -> Any:
        from transport.messages import PeerList

        now = self.clock()
        rows = self.registry.rows()
        if env.body.cluster is not None:
            rows = [row for row in rows if row["cluster"] == env.body.cluster]
        for row in rows:
            row["last_seen_ago_s"] = round(max(0.0, now - row["last_seen"]), 3)
        return PeerList(rows=rows)

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a registry request; a refusal becomes an `error` reply with its code (and is counted)."""
        from transport.rpc import RpcError

        try:
            return fn(*args, **kwargs)
        except RequestError as exc:
            raise RpcError(exc.code, exc.message) from None
        except ValueError as exc:  # a value the peer table cannot hold (e.g. beyond 64 bits)
            raise RpcError("bad_request", str(exc)) from None

    # --- time --------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_s)
            try:
                self.registry.sweep(self.clock())
            except Exception:  # a failing disk must not end liveness tracking for good
                log.exception("liveness sweep failed; retrying")


async def serve_bootstrap(config: BootstrapConfig, stop: asyncio.Event) -> None:
    """Run a bootstrap until `stop` is set (the CLI sets it on SIGINT/SIGTERM)."""
    service = await Bootstrap.create(config)
    try:
        await stop.wait()
        log.info("bootstrap shutting down")
    finally:
        await service.stop()
