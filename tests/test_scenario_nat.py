"""Several hosts for real (issue 13): network namespaces, the bootstrap in one, two nodes
anyone can dial in another, a node behind an iptables masquerade in a third, all started as
the README's "Several hosts" section says, the node behind the NAT carried by a relay that a
dialable node volunteers (scenarios/nat.py). Skips, saying why, where the
machine does not allow namespaces or has no iptables."""

import pytest

from scenarios import nat


@pytest.mark.timeout(400)
def test_a_node_behind_a_nat_is_marked_unreachable_never_helps_trains_through_a_relay_and_is_merged(tmp_path):
    why = nat.unavailable()
    if why is not None:
        pytest.skip(f"scenarios/nat.py cannot build its network here: {why}")
    result = nat.run(tmp_path, rounds=2)
    assert result["reachable"] == {"open-strong": True, "open-weak": True, "home": False}
    assert result["relayed"] == {"open-strong": None, "open-weak": None, "home": f"{nat.OPEN_IP}:{nat.RELAY_PORT}"}
    # gossip pushes reached the home node through the relay; the relay counted the same bytes
    assert result["relay_bytes"] > 64 << 10 and result["relay_bytes_served"][0] > 64 << 10
    assert result["unreachable_as_helper"] == 0 and result["unreachable_as_provisional_helper"] == 0
    assert result["helpers"]["open-weak"] == ["open-strong"]  # the weak owner's only helper: the dialable one
    assert result["finished"] == {"open-strong": True, "open-weak": True, "home": True}
    assert result["lost_updates"] == 0
