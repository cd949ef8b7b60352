"""Replay the attacks on identity, claims, fairness and state against a real bootstrap (and
a real node) over real sockets, and print what each one achieved.

The bootstrap is `atlas-node bootstrap` in a child process (scenarios.swarm, keys on, the
embedded tiny-gpt2 swarm). `--honest` synthetic members join it with the join token, each
from its own key, send a base digest and a fingerprint around one of four task
directions, and are planned; from then on every honest member heartbeats every
heartbeat_s with that deadline, and their latency is measured by phase. One real pure
helper (`atlas-node join`) is started beside them for the attacks on a node. Then:

- identity: a join naming a member's id from another key (`hijack`); heartbeat, report,
  fingerprint, base digest, get_assignment and leave sent by one member in another's name
  (`forged_*`); a key that never joined reading the peer table or an assignment
  (`stranger_reads_*`); a socket without CURVE joining (`plain_socket_join`); a stranger
  and another member asking the real helper for an owner's server-side adapter
  (`*_return_get`);
- claims: a join offering 1000 TB and 1000 Gbit/s (`capability_lie`);
- fields: requests with a 1 MB address, model or leave reason, a 3.9 MB report and a
  report of 10,000 keys, built by hand so no client-side check stops them (`oversized_*`);
- fairness: a member's socket that sends `--deaf` peer-table requests and never reads a
  reply (`non_reading_client`), then, with it still there, `--flood` joins made with the
  token from as many fresh keys by a separate process, each sending a base digest and
  then falling silent so they all die `dead_after` later (`join_flood`), measured until
  the flood is over and its rows have died (dead_after and three heartbeats more);
- state: the bootstrap SIGKILLed, its state copied and damaged (the -wal removed, the
  database truncated to half, garbage written over it), and `atlas-node bootstrap`
  started on each copy (`damaged_state_*`).

An attack is `accepted` when it got what it asked for: for a request, any reply other
than an error (or a state change it should not have made); for the fairness attacks,
an honest heartbeat answered late or an honest member seen suspect or dead during it;
for a damaged state, a bootstrap that started on it with another number of peers than
the state held (one that refuses, or starts with all of them, did not fall for it). `--json PATH` writes `attacks`
(name -> {"accepted": ..., "reply": ..., ...}), `honest_heartbeat_p99_s` (over the
fairness phases, a heartbeat without an answer within its deadline counted as the
deadline), `honest_suspects`, `bootstrap_peak_rss_mb` (VmHWM of the bootstrap and its coordinator process) and the per-phase
latencies, with this process's own event-loop lag beside them.

    python benchmarks/adversarial.py [--honest 40] [--deaf 1000] [--flood 2000]
        [--flood-timeout 600] [--json PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402
import zmq.auth  # noqa: E402

from atlas_p2p.capabilities import Capabilities  # noqa: E402
from nodes.bootstrap import TOKEN_FILE  # noqa: E402
from scenarios.swarm import Swarm, tree_peak_rss_mb  # noqa: E402
from scenarios.waiting import wait_until  # noqa: E402
from transport.codec import PROTOCOL_VERSION, decode, encode  # noqa: E402
from transport.messages import (  # noqa: E402
    Assignment,
    BaseDigest,
    Envelope,
    Error,
    Fingerprint,
    GetAssignment,
    Heartbeat,
    Join,
    Leave,
    PeerList,
    Peers,
    Report,
    ReturnGet,
)
from transport.rpc import RpcClient, RpcError, RpcServer, RpcTimeout, tcp_endpoint  # noqa: E402
from transport.security import JoinToken, Keypair, secure_client  # noqa: E402

DIGEST = "ab" * 32  # the swarm's base digest (the first one accepted is the swarm's)
TASKS = 4
HEARTBEAT_S, SUSPECT_S, DEAD_S = 2.0, 6.0, 15.0  # the bootstrap's defaults
STRONG, WEAK, HELPER = 12 * 10**6, 4 * 10**6, 24 * 10**6  # tiny-gpt2 budgets (scenarios.churn)
REFUSALS = ("unauthorized", "bad_token")  # the identity refusals


@dataclass(frozen=True)
class Target:
    """A bootstrap to attack: where it is, its public key, and the swarm's join secret."""

    address: str
    server_key: bytes
    secret: str
    digest: str = DIGEST  # the swarm's base digest, public in the peer table

    @classmethod
    def from_token(cls, address: str, token: JoinToken, digest: str = DIGEST) -> Target:
        return cls(address, token.server_key, token.secret, digest)

    def client(self, name: str, keypair: Keypair | None = None) -> RpcClient:
        """A CURVE client of the bootstrap under `keypair` (a fresh key when None)."""
        client = RpcClient(name, keypair=keypair or Keypair.generate())
        client.set_server_key(self.address, self.server_key)
        return client


@dataclass
class Member:
    """A synthetic node: its client (with its own key) to the bootstrap, the id it was given,
    and a server at its advertised address that answers pings under the same key (the
    bootstrap dials every joined node back: nodes/reachability.py)."""

    name: str
    client: RpcClient
    bootstrap: str
    node_id: int = 0
    server: RpcServer | None = None

    async def call(self, body: Any, timeout: float = 10.0) -> Any:
        return await self.client.call(self.bootstrap, body, timeout=timeout)

    async def stop(self) -> None:
        await self.client.stop()
        if self.server is not None:
            await self.server.stop()


async def enter(target: Target, name: str, memory: int, has_data: bool, **join: Any) -> Member:
    """Join `target` with the token from a fresh key, serving pings at the address it
    advertises, and send the swarm's base digest."""
    client = target.client(name)
    server = await RpcServer.create("127.0.0.1", 0, {"ping": _answer}, keypair=client.keypair)
    member = Member(name, client, target.address, server=server)
    offer = Capabilities(memory_bytes=memory, bandwidth_bps=50 * 10**6, compute_score=1.0, has_data=has_data)
    welcome = await member.call(Join.offer(offer, address=server.address, token=target.secret, **join))
    member.node_id = welcome.node_id
    await member.call(BaseDigest(node_id=member.node_id, digest=target.digest))
    return member


async def _answer(env: Any) -> None:
    return None


def fingerprint(node_id: int, task: int, rng: np.random.Generator) -> Fingerprint:
    """A unit fingerprint near task direction `task` (directions fixed by the seed 0)."""
    directions = np.random.default_rng(0).standard_normal((TASKS, 64))
    vector = directions[task] + 0.2 * rng.standard_normal(64)
    return Fingerprint(node_id=node_id, vector=(vector / np.linalg.norm(vector)).astype(np.float32), n_samples=64)


# ------------------------------------------------------------------ one request, judged


async def attempt(client: RpcClient, address: str, body: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Send `body`; accepted unless it was refused with an error code or got no answer."""
    try:
        reply = await client.call(address, body, timeout=timeout)
    except RpcTimeout:
        return {"accepted": False, "reply": "no answer"}
    except RpcError as exc:
        return {"accepted": False, "reply": exc.code, "detail": exc.message[:160]}
    return {"accepted": True, "reply": type(reply).TYPE}


async def raw_call(
    target: Target, keypair: Keypair, valid: Any, timeout: float = 10.0, **override: Any
) -> dict[str, Any]:
    """The message `valid` with the fields in `override` replaced after every client-side
    check (so values the schema would refuse reach the server), on its own CURVE socket;
    judged like `attempt`."""
    body = {**valid.to_dict(), **override}
    header = {"v": PROTOCOL_VERSION, "type": type(valid).TYPE, "id": 1, "src": "raw", "body": body}
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keypair, target.server_key)
    sock.connect(tcp_endpoint(target.address))
    try:
        await sock.send_multipart([msgpack.packb(header, use_bin_type=True)])
        frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
    except TimeoutError:
        return {"accepted": False, "reply": "no answer"}
    finally:
        sock.close(linger=0)
    reply = decode(frames).body
    if isinstance(reply, Error):
        return {"accepted": False, "reply": reply.code, "detail": reply.message[:160]}
    return {"accepted": True, "reply": type(reply).TYPE}


async def read_table(reader: Member) -> dict[int, dict[str, Any]]:
    """The peer table as `reader` sees it: id -> row."""
    reply = await reader.call(Peers(), timeout=20.0)
    if not isinstance(reply, PeerList):
        raise RuntimeError(f"peers answered {type(reply).TYPE}")
    return {int(r["id"]): r for r in reply.rows}


# ------------------------------------------------------------------ identity, claims, fields

WATCHED = ("address", "status", "memory_bytes", "bandwidth_bps", "cluster", "helper", "role")


async def identity_attacks(
    target: Target, victim: Member, attacker: Member, reader: Member, helper_of_victim: int | None
) -> dict[str, dict[str, Any]]:
    """Hijack and forgeries in `victim`'s name, strangers reading; each also checks that the
    victim's row (address, status, budgets, plan columns) did not change."""
    results: dict[str, dict[str, Any]] = {}
    before = (await read_table(reader))[victim.node_id]

    async def judged(name: str, outcome: dict[str, Any]) -> None:
        after = (await read_table(reader))[victim.node_id]
        changed = sorted(k for k in WATCHED if before.get(k) != after.get(k))
        results[name] = {**outcome, "victim_row_changed": changed, "accepted": outcome["accepted"] or bool(changed)}

    hijacker = target.client("hijacker")
    try:
        offer = Capabilities(memory_bytes=STRONG, bandwidth_bps=10**9, compute_score=1.0, has_data=True)
        join = Join.offer(offer, address="127.0.0.1:7666", token=target.secret, node_id=victim.node_id)
        await judged("hijack", await attempt(hijacker, target.address, join))
    finally:
        await hijacker.stop()
    rng = np.random.default_rng(1)
    forged = {
        "forged_heartbeat": Heartbeat(node_id=victim.node_id, state="training"),
        "forged_report": Report(
            node_id=victim.node_id, metrics={"event": "helper_failed", "helper": helper_of_victim or 0}
        ),
        "forged_fingerprint": fingerprint(victim.node_id, 3, rng),
        "forged_base_digest": BaseDigest(node_id=victim.node_id, digest="cd" * 32),
        "forged_get_assignment": GetAssignment(node_id=victim.node_id),
        "forged_leave": Leave(node_id=victim.node_id, reason="forged"),
    }
    for name, body in forged.items():
        await judged(name, await attempt(attacker.client, target.address, body))
    stranger = target.client("stranger")
    try:
        await judged("stranger_reads_peers", await attempt(stranger, target.address, Peers()))
        await judged(
            "stranger_reads_assignment", await attempt(stranger, target.address, GetAssignment(node_id=victim.node_id))
        )
    finally:
        await stranger.stop()
    plain = RpcClient("plain")
    try:
        offer = Capabilities(memory_bytes=STRONG, bandwidth_bps=10**7, compute_score=1.0, has_data=True)
        body = Join.offer(offer, address="127.0.0.1:7667", token=target.secret)
        await judged("plain_socket_join", await attempt(plain, target.address, body, timeout=3.0))
    finally:
        await plain.stop()
    return results


async def node_attacks(node_address: str, node_key: bytes, owner: Member, other: Member) -> dict[str, dict[str, Any]]:
    """A stranger and another member ask a real node for `owner`'s server-side adapter."""
    ask = ReturnGet(owner_id=owner.node_id, cluster=0, round=0)
    stranger = RpcClient("stranger", keypair=Keypair.generate())
    other_client = RpcClient(f"{other.name}-to-node", keypair=other.client.keypair)
    results = {}
    try:
        for name, client in (("stranger_return_get", stranger), ("member_return_get", other_client)):
            client.set_server_key(node_address, node_key)
            outcome = await attempt(client, node_address, ask)
            # `not_serving` means the identity check let it through and only the missing adapter stopped it
            outcome["accepted"] = outcome["reply"] not in (*REFUSALS, "no answer")
            results[name] = outcome
    finally:
        await stranger.stop()
        await other_client.stop()
    return results


async def claim_attacks(target: Target) -> dict[str, dict[str, Any]]:
    """A join offering 1000 TB and 1000 Gbit/s (built by hand: the client checks the bounds too)."""
    join = _join(target, "127.0.0.1:7668")
    lie = await raw_call(target, Keypair.generate(), join, memory_bytes=1000 * 10**12, bandwidth_bps=1000 * 10**9)
    return {"capability_lie": lie}


def _join(target: Target, address: str) -> Join:
    offer = Capabilities(memory_bytes=STRONG, bandwidth_bps=10**7, compute_score=1.0, has_data=True)
    return Join.offer(offer, address=address, token=target.secret)


async def field_attacks(target: Target, attacker: Member) -> dict[str, dict[str, Any]]:
    """Requests with fields far over any sane length, from a member's own key."""
    me = attacker.node_id
    big = "x" * 10**6
    report = Report(node_id=me, metrics={})
    cases = {
        "oversized_address": (_join(target, "127.0.0.1:7669"), {"address": "127.0.0.1:" + big}),
        "oversized_model": (_join(target, "127.0.0.1:7669"), {"model": big}),
        "oversized_leave_reason": (Leave(node_id=me), {"reason": big}),
        "oversized_report": (report, {"metrics": {"blob": "y" * 3_900_000}}),
        "report_of_10000_keys": (report, {"metrics": {f"k{i}": i for i in range(10_000)}}),
    }
    results = {}
    for name, (valid, override) in cases.items():
        keypair = Keypair.generate() if isinstance(valid, Join) else attacker.client.keypair
        results[name] = await raw_call(target, keypair, valid, **override)
    return results


# ------------------------------------------------------------------ honest load


@dataclass
class Latencies:
    """Honest heartbeat round trips of one phase, and how late this process's own event
    loop woke up meanwhile (a measure of the driver, not of the bootstrap)."""

    values: list[float] = field(default_factory=list)
    late: int = 0  # no answer within the heartbeat deadline
    errors: Counter[str] = field(default_factory=Counter)
    loop_lag: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Quantiles over every heartbeat, a late one counted as the deadline (so a p99 equal
        to HEARTBEAT_S means at least 1% went unanswered in time)."""
        v = sorted(self.values + [HEARTBEAT_S] * self.late)
        lag = sorted(self.loop_lag)
        return {
            "heartbeats": len(v) + sum(self.errors.values()),
            "p50_s": _quantile(v, 0.50),
            "p99_s": _quantile(v, 0.99),
            "max_s": round(v[-1], 4) if v else None,
            "late": self.late,
            "errors": dict(self.errors),
            "driver_loop_lag_p99_s": _quantile(lag, 0.99),
        }


def _quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted `values` (inclusive method), rounded; None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 4)


class Honest:
    """Every member heartbeats every HEARTBEAT_S (staggered; members may be added while it
    runs) with that deadline; latencies go to the current phase. A watcher reads the table
    through the first member every second and keeps the members it saw suspect or dead, by
    phase (the `setup` phase, while the fleet joins and waits for its plan, is not counted)."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.phases: dict[str, Latencies] = {}
        self.start_phase("setup")
        self.seen: dict[int, list[str]] = {}  # member id -> "phase: status" sightings
        self.table_reads: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()

    def start_phase(self, name: str) -> Latencies:
        self.phase = self.phases.setdefault(name, Latencies())
        self.phase_name = name
        return self.phase

    def suspects(self, phases: Sequence[str] | None = None) -> dict[int, list[str]]:
        """Members seen suspect or dead in `phases` (None: every phase but setup)."""
        wanted = [p for p in self.phases if p != "setup"] if phases is None else list(phases)
        out = {}
        for node_id, sightings in self.seen.items():
            hits = [x for x in sightings if x.split(":")[0] in wanted]
            if hits:
                out[node_id] = hits
        return out

    async def __aenter__(self) -> Honest:
        self._tasks = [asyncio.create_task(f()) for f in (self._beat_all, self._watch, self._lag)]
        return self

    async def _lag(self) -> None:
        """How much later than asked this loop wakes from a 50 ms sleep."""
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.05)
            self.phase.loop_lag.append(time.perf_counter() - start - 0.05)

    async def __aexit__(self, *exc: object) -> None:
        for task in [*self._tasks, *self._inflight]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._inflight, return_exceptions=True)

    async def _beat(self, member: Member) -> None:
        phase = self.phase
        start = time.perf_counter()
        try:
            await member.call(Heartbeat(node_id=member.node_id, state="training"), timeout=HEARTBEAT_S)
            phase.values.append(time.perf_counter() - start)
        except RpcTimeout:
            phase.late += 1
        except RpcError as exc:
            phase.errors[exc.code] += 1

    async def _beat_all(self) -> None:
        k = 0
        while True:
            if not self.members:
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._beat(self.members[k % len(self.members)]))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            k += 1
            await asyncio.sleep(HEARTBEAT_S / len(self.members))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self.members:
                continue
            ids = {m.node_id for m in self.members}
            try:
                for node_id, row in (await read_table(self.members[0])).items():
                    if node_id in ids and row["status"] in ("suspect", "dead"):
                        self.seen.setdefault(node_id, []).append(f"{self.phase_name}: {row['status']}")
                self.table_reads["ok"] += 1
            except RpcTimeout:
                self.table_reads["no answer"] += 1
            except RpcError as exc:
                self.table_reads[exc.code] += 1


@contextlib.asynccontextmanager
async def deaf_client(target: Target, member: Member, requests: int):
    """`member`'s key on a socket that sends `requests` peer-table requests and never reads."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    secure_client(sock, member.client.keypair, target.server_key)
    sock.connect(tcp_endpoint(target.address))
    try:
        for i in range(requests):
            await sock.send_multipart(encode(Envelope.of(Peers(), i + 1, "deaf")))
        yield sock
    finally:
        sock.close(linger=0)


async def flood(target: Target, count: int, concurrency: int = 32) -> dict[str, Any]:
    """`count` joins with the token, each from a fresh key, each followed by a base digest;
    then silence (the rows die dead_after later). A join told `busy` (the bootstrap's
    join rate) is sent again 50 ms later until it gets in; those retries are counted."""
    gate = asyncio.Semaphore(concurrency)
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with gate:
            client = target.client(f"flood-{i}")
            try:
                offer = Capabilities(memory_bytes=STRONG, bandwidth_bps=50 * 10**6, compute_score=1.0, has_data=True)
                join = Join.offer(offer, address=f"127.0.0.1:{30000 + i}", token=target.secret)
                welcome = await _join_until_admitted(client, target.address, join, outcomes)
                await client.call(target.address, BaseDigest(node_id=welcome.node_id, digest=target.digest), timeout=30)
                outcomes["joined"] += 1
            except RpcTimeout:
                outcomes["no answer"] += 1
            except RpcError as exc:
                outcomes[exc.code] += 1
            finally:
                await client.stop()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return {"outcomes": dict(outcomes), "seconds": round(time.perf_counter() - start, 1)}


async def _join_until_admitted(client: RpcClient, address: str, join: Join, outcomes: Counter[str]) -> Any:
    """`join`, sent again 50 ms after each `busy` (counted as busy_retries) until admitted."""
    while True:
        try:
            return await client.call(address, join, timeout=30)
        except RpcError as exc:
            if exc.code != "busy":
                raise
            outcomes["busy_retries"] += 1
            await asyncio.sleep(0.05)


def start_flood_process(target: Target, count: int, out: Path) -> subprocess.Popen[bytes]:
    """The flood in its own process, so the honest members' loop measures the bootstrap only."""
    args = [sys.executable, __file__, "flood", target.address, target.server_key.decode(), target.secret, target.digest]
    return subprocess.Popen([*args, str(count), str(out)], stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------ damaged state


DAMAGES = ("wal_removed", "db_truncated", "db_garbage")


def damaged_state_attacks(swarm: Swarm, work: Path, only: Sequence[str] = DAMAGES) -> dict[str, dict[str, Any]]:
    """SIGKILL the bootstrap, count the peers its state holds (an intact copy, its -wal
    replayed), then start `atlas-node bootstrap` on damaged copies. Accepted: a bootstrap
    that started with another number of peers (a state lost in silence); one that refuses,
    or starts with all of them, is not."""
    swarm.kill("bootstrap", signal.SIGKILL)
    state = swarm.workdir / "bootstrap"
    db = next(state.glob("*.sqlite3"))
    intact = work / "state-intact"
    shutil.copytree(state, intact)
    with contextlib.closing(sqlite3.connect(intact / db.name)) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM peers").fetchone()[0]

    def no_wal(copy: Path) -> None:
        for wal in copy.glob("*-wal"):
            wal.unlink()

    def truncated(copy: Path) -> None:
        path = copy / db.name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        no_wal(copy)

    def garbage(copy: Path) -> None:
        (copy / db.name).write_bytes(b"not a database " * 1000)
        no_wal(copy)

    results = {}
    damages = {"wal_removed": no_wal, "db_truncated": truncated, "db_garbage": garbage}
    for name in only:
        damage = damages[name]
        copy = work / f"state-{name}"
        shutil.copytree(state, copy)
        (copy / "bootstrap.lock").unlink(missing_ok=True)
        damage(copy)
        outcome = start_on(swarm, copy)
        outcome["accepted"] = outcome["known_peers"] is not None and outcome["known_peers"] != rows
        outcome["peers_in_state"] = rows
        results[f"damaged_state_{name}"] = outcome
    return results


def start_on(swarm: Swarm, state: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Start a bootstrap on `state` and stop it once it binds (writes bootstrap.json with its
    pid): `known_peers` is what it said it found (None when it exited first), `last_line`
    its last stderr line, `reply` its exit code."""
    (state / "bootstrap.json").unlink(missing_ok=True)
    proc = swarm.start_command("bootstrap", "--bind", "127.0.0.1:0", "--state", str(state))

    def settled() -> bool:
        info = state / "bootstrap.json"
        return proc.poll() is not None or (info.exists() and f'"pid": {proc.pid}' in info.read_text())

    wait_until(settled, timeout, what=f"a bootstrap on {state.name} to bind or exit")
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        result = swarm.finish_command(proc, timeout=30)
        started = True
    else:
        result = swarm.finish_command(proc, timeout=30)
        started = False
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    found = re.search(r"(\d+) known peers", result.stderr)
    return {
        "accepted": started,
        "reply": f"exit {result.returncode}" if not started else "started",
        "known_peers": int(found.group(1)) if started and found else None,
        "last_line": lines[-1] if lines and not started else "",
    }


# ------------------------------------------------------------------ the run


async def fleet(target: Target, count: int, members: list[Member]) -> None:
    """`count` honest members appended to `members` as each joins (so it heartbeats from
    then on): one in five a pure helper, of the data nodes one in three weak; joined, base
    digest and fingerprint sent."""
    rng = np.random.default_rng(2)
    for i in range(count):
        helper = i % 5 == 4
        memory = HELPER if helper else (WEAK if i % 3 == 2 else STRONG)
        member = await enter(target, f"honest-{i}", memory, not helper)
        members.append(member)
        if not helper:
            await member.call(fingerprint(member.node_id, i % TASKS, rng))


def _bootstrap_flags(data_nodes: int) -> list[str]:
    flags = ["--model", "tiny-gpt2", "--task", "seq_cls", "--num-labels", "4", "--batch-size", "8"]
    return [*flags, "--max-seq-len", "16", "--min-nodes", str(data_nodes), "--assign-after", "600"]


async def run(args: argparse.Namespace, swarm: Swarm, say: Callable[[str], None]) -> dict[str, Any]:
    data_nodes = sum(1 for i in range(args.honest) if i % 5 != 4)
    swarm.start_bootstrap(extra=_bootstrap_flags(data_nodes), timeout=120)
    token = JoinToken.parse((swarm.workdir / "bootstrap" / TOKEN_FILE).read_text())
    swarm.add_node("real-helper", memory="24MB", bandwidth="100Mbps")
    say(f"bootstrap {swarm.address} (pid {swarm.bootstrap.pid}); waiting for a real helper to load the base")
    digest = await poll_value(
        lambda: _swarm_digest(Target.from_token(swarm.address, token)), 300, "the real helper's base digest"
    )
    target = Target.from_token(swarm.address, token, digest)
    say(f"swarm base {digest[:12]}; {args.honest} honest members joining")
    attacks: dict[str, dict[str, Any]] = {}
    honest = Honest()
    async with honest:
        await fleet(target, args.honest, honest.members)
        members = honest.members
        reader, victim = members[0], members[2]  # a weak owner
        attacker = await enter(target, "attacker", STRONG, True)
        assignment = await wait_planned(victim, 300)
        say(f"planned: victim {victim.node_id} is {assignment.role} with helper {assignment.helper}")
        honest.start_phase("calm")
        await asyncio.sleep(args.calm)
        honest.start_phase("identity")
        attacks.update(await identity_attacks(target, victim, attacker, reader, assignment.helper))
        attacks.update(await claim_attacks(target))
        attacks.update(await field_attacks(target, attacker))
        helper_id = swarm.node_id("real-helper", timeout=300)
        row = await poll_value(lambda: _row_of(reader, helper_id), 120, "the real helper's row")
        node_key, _ = zmq.auth.load_certificate(swarm.out_dir("real-helper") / "node.key")
        attacks.update(await node_attacks(row["address"], node_key, victim, attacker))
        say("identity, claims and fields done; a client that never reads, then the join flood")
        honest.start_phase("non_reading_client")
        async with deaf_client(target, attacker, args.deaf):
            await asyncio.sleep(args.deaf_window)
            honest.start_phase("join_flood")
            out = Path(swarm.workdir) / "flood.json"
            proc = start_flood_process(target, args.flood, out)
            started = time.monotonic()
            try:
                while proc.poll() is None and time.monotonic() - started < args.flood_timeout:
                    await asyncio.sleep(0.5)
                # the flood's rows fall silent at once: measure until they have died and been swept
                await asyncio.sleep(DEAD_S + 3 * HEARTBEAT_S)
            finally:
                if proc.poll() is None:  # still joining at the timeout: its figures are missing
                    proc.terminate()
                proc.wait()
        honest.start_phase("after")
        await asyncio.sleep(2 * HEARTBEAT_S)
    flooded = json.loads(out.read_text()) if out.exists() else {"outcomes": {}, "seconds": None, "unfinished": True}
    rss = tree_peak_rss_mb(swarm.bootstrap.pid)  # its coordinator process included
    try:
        page = await reader.call(Peers(), timeout=60.0)
        table_rows = getattr(page, "total", len(page.rows))  # all pages (a page holds at most PEERS_PAGE_MAX)
    except RpcError as exc:  # RpcTimeout included: a bootstrap still busy is a figure too
        table_rows = f"no answer to peers ({exc.code})"
    for name in ("non_reading_client", "join_flood"):
        phase = honest.phases[name]
        seen = honest.suspects([name])
        attacks[name] = {
            "accepted": phase.late > 0 or bool(seen),
            "reply": f"{phase.late} late, {len(seen)} honest suspect",
            **phase.summary(),
        }
    attacks["join_flood"]["flood"] = flooded
    fairness = [honest.phases[p] for p in ("non_reading_client", "join_flood")]
    late = sum(p.late for p in fairness)
    for member in [*members, attacker]:
        await member.stop()
    attacks.update(damaged_state_attacks(swarm, Path(swarm.workdir)))
    suspects = honest.suspects()
    return {
        "attacks": attacks,
        "honest_heartbeat_p99_s": Latencies([x for p in fairness for x in p.values], late).summary()["p99_s"],
        "honest_heartbeats_late": late,
        "honest_suspects": len(suspects),
        "honest_suspect_detail": {str(k): v[:3] for k, v in suspects.items()},
        "bootstrap_peak_rss_mb": rss,
        "table_rows_after_flood": table_rows,
        "bootstrap_answered_peers_after_flood": isinstance(table_rows, int),
        "table_reads": dict(honest.table_reads),
        "phases": {name: phase.summary() for name, phase in honest.phases.items()},
        "config": {k: str(v) for k, v in vars(args).items()},
    }


async def wait_planned(member: Member, timeout: float) -> Assignment:
    """`member`'s assignment once the bootstrap has planned it (a role other than waiting)."""

    async def planned() -> Assignment | None:
        reply = await member.call(GetAssignment(node_id=member.node_id))
        return reply if isinstance(reply, Assignment) and reply.role != "waiting" else None

    return await poll_value(planned, timeout, f"{member.name} to be planned")


async def _swarm_digest(target: Target) -> str | None:
    """The base digest some row of the table carries (read with the token), None before one."""
    client = target.client("digest-reader")
    try:
        reply = await client.call(target.address, Peers(token=target.secret), timeout=10)
    finally:
        await client.stop()
    return next((r["base_digest"] for r in reply.rows if r.get("base_digest")), None)


async def _row_of(reader: Member, node_id: int) -> dict[str, Any] | None:
    row = (await read_table(reader)).get(node_id)
    return row if row is not None and row.get("status") == "alive" else None


async def poll_value(make: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await `make()` every half second until it returns something truthy (an RPC error or
    no answer counts as not yet); RuntimeError naming `what` after `timeout` s."""

    async def poll() -> Any:
        while True:
            with contextlib.suppress(RpcError, RpcTimeout):
                value = await make()
                if value:
                    return value
            await asyncio.sleep(0.5)

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}") from None


def print_report(result: dict[str, Any], say: Callable[[str], None] = print) -> None:
    say("")
    say(f"{'attack':<34} {'accepted':<9} reply")
    for name, outcome in result["attacks"].items():
        extra = outcome.get("last_line") or ", ".join(outcome.get("victim_row_changed", []))
        if outcome.get("known_peers") is not None:
            extra = f"{outcome['known_peers']} known peers"
        say(f"{name:<34} {str(outcome['accepted']).lower():<9} {outcome['reply']}" + (f"  ({extra})" if extra else ""))
    for name, phase in result["phases"].items():
        say(
            f"honest heartbeats, {name:<20} n={phase['heartbeats']:<5} p50 {phase['p50_s']} s, p99 {phase['p99_s']} s, "
            f"max {phase['max_s']} s, late {phase['late']}, errors {phase['errors']}, "
            f"driver loop lag p99 {phase['driver_loop_lag_p99_s']} s"
        )
    flood = result["attacks"].get("join_flood", {}).get("flood", {})
    say(
        f"join flood: {flood.get('outcomes')} in {flood.get('seconds')} s; table rows after: {result['table_rows_after_flood']}"
    )
    say(
        f"honest_heartbeat_p99_s {result['honest_heartbeat_p99_s']}, honest_suspects {result['honest_suspects']}, "
        f"bootstrap_peak_rss_mb {result['bootstrap_peak_rss_mb']}"
    )
    accepted = [n for n, o in result["attacks"].items() if o["accepted"]]
    say(f"accepted attacks: {', '.join(accepted) if accepted else 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--honest", type=int, default=40, help="synthetic honest members (heartbeating)")
    parser.add_argument("--deaf", type=int, default=1000, help="requests the non-reading client sends")
    parser.add_argument("--flood", type=int, default=2000, help="joins of the flood")
    parser.add_argument("--calm", type=float, default=10.0, help="seconds of honest heartbeats before the attacks")
    parser.add_argument("--deaf-window", type=float, default=15.0, help="seconds measured with the non-reader alone")
    parser.add_argument("--flood-timeout", type=float, default=600.0, help="seconds the flood may take at most")
    parser.add_argument("--json", type=Path, dest="json_path")
    parser.add_argument("--workdir", type=Path, help="keep the state and logs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.honest < 5:
        parser.error(f"--honest must be >= 5, got {args.honest}")
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atlas-adversarial-")))
        swarm = stack.enter_context(Swarm(work, heartbeat_s=HEARTBEAT_S, suspect_after=SUSPECT_S, dead_after=DEAD_S))
        result = asyncio.run(run(args, swarm, print))
    print_report(result)
    if args.json_path:
        args.json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"figures written to {args.json_path}")
    return 0


def _flood_main(argv: list[str]) -> None:
    address, key, secret, digest, count, out = argv
    result = asyncio.run(flood(Target(address, key.encode(), secret, digest), int(count)))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["flood"]:
        _flood_main(sys.argv[2:])
    else:
        sys.exit(main())
