"""The attacks of benchmarks/adversarial.py replayed against a real bootstrap over real
sockets (keys on): every impersonation, lie and oversized field is refused with an error
code and changes nothing; a damaged state is refused by `atlas-node bootstrap`; a join
flood with a non-reading client beside it still leaves honest requests answered."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.adversarial import (
    REFUSALS,
    STRONG,
    WEAK,
    Target,
    _join,
    claim_attacks,
    damaged_state_attacks,
    deaf_client,
    enter,
    field_attacks,
    fingerprint,
    flood,
    identity_attacks,
    raw_call,
    read_table,
    wait_planned,
)
from nodes.bootstrap import TOKEN_FILE, Bootstrap
from nodes.config import BootstrapConfig, SwarmSpec
from scenarios.swarm import Swarm
from transport.messages import Heartbeat, Ok, Peers
from transport.security import JoinToken, Keypair


async def _swarm(boot: Bootstrap, target: Target, data_nodes: int):
    """`data_nodes` members with fingerprints (the bootstrap plans them) and an attacker."""
    import numpy as np

    rng = np.random.default_rng(0)
    members = []
    for i in range(data_nodes):
        member = await enter(target, f"m{i}", WEAK if i % 2 else STRONG, True)
        await member.call(fingerprint(member.node_id, i % 2, rng))
        members.append(member)
    attacker = await enter(target, "attacker", STRONG, True)
    return members, attacker


async def _stop(members) -> None:
    for member in members:
        await member.stop()


@pytest.mark.serial  # a victim's heartbeat deadline: run alone (Makefile), not beside other tests
def test_every_impersonation_lie_and_oversized_field_is_refused_and_changes_nothing(tmp_path):
    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=4, assign_after_s=600)
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path), swarm=spec)
        target = Target.from_token(boot.address, boot.token)
        members, attacker = await _swarm(boot, target, 4)
        try:
            victim, reader = members[1], members[0]
            await wait_planned(victim, 120)
            rows_before = await read_table(reader)

            identity = await identity_attacks(target, victim, attacker, reader, helper_of_victim=members[0].node_id)
            claims = await claim_attacks(target)
            fields = await field_attacks(target, attacker)

            for name, outcome in identity.items():
                assert not outcome["accepted"], (name, outcome)
                assert outcome["victim_row_changed"] == [], name
            assert {o["reply"] for n, o in identity.items() if n != "plain_socket_join"} <= set(REFUSALS)
            assert claims["capability_lie"]["reply"] == "bad_request"
            assert all(not o["accepted"] and o["reply"] in ("bad_schema", "bad_request") for o in fields.values()), (
                fields
            )
            assert (await read_table(reader)).keys() == rows_before.keys()  # no row was added by any of them
            # the hand-built path itself works: the same join, unaltered, is welcomed
            assert (await raw_call(target, Keypair.generate(), _join(target, "127.0.0.1:7300")))["accepted"]
        finally:
            await _stop([*members, attacker])
            await boot.stop()

    asyncio.run(body())


@pytest.mark.serial  # honest requests' deadlines under a flood: run alone
def test_a_join_flood_beside_a_non_reading_client_leaves_honest_requests_answered(tmp_path):
    async def body():
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path))
        target = Target.from_token(boot.address, boot.token)
        honest = await enter(target, "honest", STRONG, True)
        deaf = await enter(target, "deaf", STRONG, True)
        try:
            async with deaf_client(target, deaf, 300):
                flooded = await flood(target, 100)
                beat = await honest.call(Heartbeat(node_id=honest.node_id, state="training"))
                page = await honest.call(Peers())

            assert flooded["outcomes"] == {"joined": 100}
            assert isinstance(beat, Ok)  # a bootstrap without a coordinator answers heartbeats with ok
            assert getattr(page, "total", len(page.rows)) == 102
            assert boot.registry.table.get(honest.node_id).status == "alive"
        finally:
            await _stop([honest, deaf])
            await boot.stop()

    asyncio.run(body())


@pytest.mark.parametrize("state", ["wal_removed", "db_truncated", "db_garbage"])
def test_a_damaged_state_is_refused_or_loses_nothing(tmp_path, state):
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start_bootstrap(timeout=180)  # a loaded machine takes a while to start a python process
        token = JoinToken.parse((swarm.workdir / "bootstrap" / TOKEN_FILE).read_text())
        target = Target.from_token(swarm.address, token)

        async def join_two():
            members = [await enter(target, f"m{i}", STRONG, True) for i in range(2)]
            await _stop(members)

        asyncio.run(join_two())
        results = damaged_state_attacks(swarm, tmp_path, only=(state,))

    (outcome,) = results.values()
    assert outcome["peers_in_state"] == 2 and not outcome["accepted"], outcome
    if outcome["known_peers"] is None:  # refused: one line naming the state dir, exit 6
        assert outcome["reply"] == "exit 6" and "damaged" in outcome["last_line"]
    else:  # nothing was lost (a -wal already checkpointed holds nothing)
        assert outcome["known_peers"] == 2
