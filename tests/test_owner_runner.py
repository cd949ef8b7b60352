"""The owner's side of a split step turns what its helper answers into what the runtime acts
on: no address or a refusal is a failed helper (a repair, not a crash), `version` a
catch-up, `history` a re-sync."""

from __future__ import annotations

import asyncio

import pytest

from nodes.config import TrainConfig
from nodes.owner import HelperFailed, HistoryDiffers, OwnerRunner, VersionBehind
from transport.messages import Ping
from transport.rpc import RpcError


def _runner(link, helper_address):
    """An owner runner for helper 7 with no executor or session: nothing else may be called."""
    return OwnerRunner(
        link,
        None,
        None,
        TrainConfig(out_dir=None),
        owner_id=1,
        cluster=0,
        helper=7,
        helper_address=helper_address,
        ranks={},
        base_digest="",
    )


def test_a_helper_without_an_address_is_a_failed_helper_not_a_crash():
    runner = _runner(None, None)
    with pytest.raises(HelperFailed) as failed:
        asyncio.run(runner._call(Ping(), timeout=1.0))
    assert failed.value.helper == 7 and "no address" in failed.value.why


class _Answers:
    """A link on which every call is answered with the error `code`."""

    def __init__(self, code):
        self.code = code

    async def call(self, address, body, timeout=None):
        raise RpcError(self.code, f"{self.code} from the helper")


@pytest.mark.parametrize(
    "code, raised", [("version", VersionBehind), ("history", HistoryDiffers), ("bad_request", HelperFailed)]
)
def test_the_helpers_error_codes_become_what_the_runtime_acts_on(code, raised):
    runner = _runner(_Answers(code), "127.0.0.1:1")
    with pytest.raises(raised):
        asyncio.run(runner._call_once(Ping(), timeout=1.0))
