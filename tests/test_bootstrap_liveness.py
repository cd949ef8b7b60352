"""Liveness does not wait for planning: over real sockets, heartbeats (and assignments,
and checks of bad input) are answered while the coordinator is busy, and a burst of
joins and deaths reaches the coordinator in batches, not one planning pass per event."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import numpy as np
import pytest

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, SwarmSpec
from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.messages import Assignment, BaseDigest, Beat, Fingerprint, GetAssignment, Heartbeat, Join, Ok
from transport.rpc import RpcClient, RpcError
from transport.security import Keypair

pytestmark = pytest.mark.serial  # deadlines under load: run alone (Makefile), not beside other tests

DIGEST = "ab" * 32
TASK = np.eye(64, dtype=np.float32)[0]


def _join(service: Bootstrap, port: int, has_data: bool = True) -> Join:
    return Join(
        memory_bytes=100 * 10**6,
        bandwidth_bps=50 * 10**6,
        compute_score=1.0,
        address=f"127.0.0.1:{port}",
        has_data=has_data,
        token=service.token.secret,
    )


def _keyed(service: Bootstrap, name: str, clients: list[RpcClient]) -> RpcClient:
    """A client with a key of its own (a node speaks only from its key), kept in `clients`."""
    client = RpcClient(name, keypair=Keypair.generate())
    client.set_server_key(service.address, service.keypair.public)
    clients.append(client)
    return client


async def _member(
    service: Bootstrap, port: int, clients: list[RpcClient], has_data: bool = True
) -> tuple[int, RpcClient]:
    """A node that joined, sent the swarm's base and (a data node) a fingerprint: id, client."""
    client = _keyed(service, f"node-{port}", clients)
    node_id = (await client.call(service.address, _join(service, port, has_data), timeout=5)).node_id
    await client.call(service.address, BaseDigest(node_id=node_id, digest=DIGEST), timeout=5)
    if has_data:
        vector = TASK + 0.01 * np.random.default_rng(node_id).standard_normal(64).astype(np.float32)
        await client.call(service.address, Fingerprint(node_id=node_id, vector=vector, n_samples=8), timeout=5)
    return node_id, client


async def _planned(service: Bootstrap, members: list[tuple[int, RpcClient]]) -> None:
    """Heartbeat `members` until every one is answered with an assignment version."""
    for _ in range(600):
        beats = [await c.call(service.address, Heartbeat(node_id=n, state="waiting"), timeout=5) for n, c in members]
        if all(b.assignment_version > 0 for b in beats):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no first assignment: {beats}")


def test_heartbeats_assignments_and_bad_input_are_answered_while_the_coordinator_is_busy():
    async def body():
        config = BootstrapConfig(bind="127.0.0.1:0")
        service = await Bootstrap.create(config, swarm=SwarmSpec(model="tiny-gpt2", min_nodes=2, clusters=1))
        clients: list[RpcClient] = []
        try:
            members = [await _member(service, 7001 + i, clients) for i in range(2)]
            await _planned(service, members)
            node, client = members[0]
            version = service.coordination.version_for(node)

            async with service.coordination._lock:  # as while a batch plans in the coordinator process
                beat = await client.call(
                    service.address, Heartbeat(node_id=node, state="training"), timeout=config.heartbeat_s
                )
                assignment = await client.call(service.address, GetAssignment(node_id=node), timeout=5)
                try:
                    await client.call(
                        service.address, Fingerprint(node_id=node, vector=np.zeros(64, np.float32), n_samples=8)
                    )
                    refused = None
                except RpcError as exc:
                    refused = exc.code
                newcomer = _keyed(service, "newcomer", clients)
                late = await newcomer.call(service.address, _join(service, 7009), timeout=5)
                based = await newcomer.call(service.address, BaseDigest(node_id=late.node_id, digest=DIGEST), timeout=5)
                first = await newcomer.call(
                    service.address, Heartbeat(node_id=late.node_id, state="joining"), timeout=5
                )
                assert not service.coordinator.known(late.node_id)  # queued, not applied
            await service.coordination.settled()

            assert isinstance(beat, Beat) and beat.assignment_version == version
            assert isinstance(assignment, Assignment) and assignment.version == version
            assert refused == "bad_request"
            assert isinstance(based, Ok) and first.need_fingerprint and first.assignment_version == 0
            assert service.coordinator.known(late.node_id)
        finally:
            for c in clients:
                await c.stop()
            await service.stop()

    run(body(), timeout=120)


def test_a_burst_of_joins_and_deaths_is_planned_in_batches_while_honest_heartbeats_keep_their_deadline():
    async def body():
        config = BootstrapConfig(
            bind="127.0.0.1:0", heartbeat_s=1.0, suspect_after_s=3.0, dead_after_s=5.0, sweep_s=0.1
        )
        service = await Bootstrap.create(config, swarm=SwarmSpec(model="tiny-gpt2", min_nodes=3, clusters=1))
        clients: list[RpcClient] = []
        answered, missed, suspects = [], [], set()
        try:
            honest = [await _member(service, 7001 + i, clients) for i in range(3)]
            honest.append(await _member(service, 7004, clients, has_data=False))
            await _planned(service, honest)

            async def heartbeats() -> None:
                while True:
                    for n, client in honest:
                        try:
                            call = Heartbeat(node_id=n, state="training")
                            answered.append(await client.call(service.address, call, timeout=config.heartbeat_s))
                        except RpcError:
                            missed.append(n)
                        row = service.registry.table.get(n)
                        if row.status != "alive":
                            suspects.add(n)
                    await asyncio.sleep(config.heartbeat_s / 2)

            beating = asyncio.create_task(heartbeats())
            before = dict(service.coordination.counts)
            joined = await asyncio.gather(
                *(_member(service, 8000 + i, clients, has_data=False) for i in range(40))
            )  # pure helpers: each one is a reason to re-plan
            strangers = [n for n, _ in joined]
            await wait_until_async(
                lambda: all(service.registry.table.get(n).status == "dead" for n in strangers),
                60,
                what="the strangers to die",
            )
            await service.coordination.settled()  # the sweep that saw them die queued their deaths
            beating.cancel()

            counts = {k: v - before.get(k, 0) for k, v in service.coordination.counts.items()}
            assert counts["events"] >= 2 * len(strangers)  # a join and a death each
            assert counts["plans"] <= counts["batches"] < counts["events"]
            assert counts["plans"] < len(strangers)
            assert all(service.coordinator.status(n) == "dead" for n in strangers)
            assert not missed and answered and not suspects
        finally:
            for c in clients:
                await c.stop()
            await service.stop()

    run(body(), timeout=180)


@contextlib.asynccontextmanager
async def _bootstrap(config: BootstrapConfig) -> AsyncIterator[tuple[Bootstrap, list[RpcClient]]]:
    """A bootstrap of a two-node tiny-gpt2 swarm, and a list for the clients a test makes;
    all stopped on the way out."""
    service = await Bootstrap.create(config, swarm=SwarmSpec(model="tiny-gpt2", min_nodes=2, clusters=1))
    clients: list[RpcClient] = []
    try:
        yield service, clients
    finally:
        for c in clients:
            await c.stop()
        await service.stop()


def test_the_coordinator_runs_in_its_own_process_and_a_new_one_takes_over_when_it_dies():
    async def body():
        async with _bootstrap(BootstrapConfig(bind="127.0.0.1:0")) as (service, clients):
            members = [await _member(service, 7001 + i, clients) for i in range(2)]
            await _planned(service, members)
            versions = {n: service.coordination.version_for(n) for n, _ in members}
            pid = service.coordination.pid()
            assert pid is not None and pid != os.getpid()

            os.kill(pid, signal.SIGKILL)
            newcomer = _keyed(service, "newcomer", clients)
            late = await newcomer.call(service.address, _join(service, 7009, has_data=False), timeout=5)
            await newcomer.call(service.address, BaseDigest(node_id=late.node_id, digest=DIGEST), timeout=5)
            await service.coordination.settled()

            assert service.coordination.counts["restarts"] == 1
            assert service.coordination.pid() not in (None, pid)
            coordinator = service.coordinator  # the new process kept the plan and every member
            assert coordinator.known(late.node_id)
            assert all(coordinator.version_for(n) >= v > 0 for n, v in versions.items())
            assignment = await members[0][1].call(service.address, GetAssignment(node_id=members[0][0]), timeout=5)
            assert assignment.version == service.coordination.version_for(members[0][0])

    run(body(), timeout=120)


def test_joins_beyond_the_join_rate_are_told_busy_and_a_node_that_retries_gets_in():
    async def body():
        config = BootstrapConfig(bind="127.0.0.1:0", join_rate=0.5)  # bursts of 1, a token every 2 s
        async with _bootstrap(config) as (service, clients):

            async def join(i: int) -> str:
                client = _keyed(service, f"burst-{i}", clients)
                try:
                    await client.call(service.address, _join(service, 7100 + i), timeout=5)
                    return "welcome"
                except RpcError as exc:
                    return exc.code

            codes = await asyncio.gather(*(join(i) for i in range(3)))  # together: one gets in
            assert sorted(codes) == ["busy", "busy", "welcome"]
            assert service.registry.table.count() == 1  # a refused join left no row

            late = _keyed(service, "late", clients)
            welcome = None
            for _ in range(100):  # what a node's join loop does: back off and try again
                try:
                    welcome = await late.call(service.address, _join(service, 7200), timeout=5)
                    break
                except RpcError as exc:
                    assert exc.code == "busy"
                    await asyncio.sleep(0.2)
            assert welcome is not None and welcome.node_id == 2

    run(body(), timeout=60)
