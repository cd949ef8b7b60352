"""The owner's side of a split step refuses to call a helper it has no address for: the
round fails over to a repair (HelperFailed) instead of the node crashing."""

from __future__ import annotations

import asyncio

import pytest

from nodes.config import TrainConfig
from nodes.owner import HelperFailed, OwnerRunner
from transport.messages import Ping


def test_a_helper_without_an_address_is_a_failed_helper_not_a_crash():
    runner = OwnerRunner(
        None,  # no link, executor or session: nothing may be called
        None,
        None,
        TrainConfig(out_dir=None),
        owner_id=1,
        cluster=0,
        helper=7,
        helper_address=None,
        ranks={},
        base_digest="",
    )
    with pytest.raises(HelperFailed) as failed:
        asyncio.run(runner._call(Ping(), timeout=1.0))
    assert failed.value.helper == 7 and "no address" in failed.value.why
