"""`peers` in pages: the bootstrap answers one bounded page with the total, and the reader
(`atlas-node peers`) follows the pages until it has every row."""

from __future__ import annotations

import pytest

from atlas_p2p.capabilities import Capabilities
from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig
from tests.aio import run
from tools.peers_view import read_pages
from transport.messages import PEERS_PAGE_DEFAULT, PEERS_PAGE_MAX, Envelope, PeerList, Peers
from transport.schema import SchemaError

OFFER = Capabilities(memory_bytes=8_000_000_000, bandwidth_bps=50_000_000, compute_score=3.0, has_data=True)


def table_pages(rows: list[dict], calls: list[tuple[int, int]]):
    """`ask(offset, limit)` over a fixed list of rows, recording each request."""

    async def ask(offset: int, limit: int) -> PeerList:
        calls.append((offset, limit))
        return PeerList(rows=rows[offset : offset + limit], total=len(rows))

    return ask


def test_reader_follows_the_pages_until_it_has_every_row():
    rows = [{"id": i} for i in range(1, 1235)]
    calls: list[tuple[int, int]] = []

    got = run(read_pages(table_pages(rows, calls), page=500))

    assert got == rows
    assert calls == [(0, 500), (500, 500), (1000, 500)]


def test_reader_with_a_limit_asks_only_for_the_rows_it_shows():
    rows = [{"id": i} for i in range(1, 1235)]
    calls: list[tuple[int, int]] = []

    got = run(read_pages(table_pages(rows, calls), page=500, limit=700))

    assert got == rows[:700]
    assert calls == [(0, 500), (500, 200)]


def test_reader_of_an_empty_table_asks_once():
    calls: list[tuple[int, int]] = []

    assert run(read_pages(table_pages([], calls))) == []
    assert calls == [(0, PEERS_PAGE_DEFAULT)]


def test_reader_keeps_a_row_seen_twice_once():
    pages = iter([PeerList(rows=[{"id": 1}, {"id": 2}], total=3), PeerList(rows=[{"id": 2}, {"id": 3}], total=4)])

    async def ask(offset: int, limit: int) -> PeerList:
        return next(pages)  # a row was added in front between the two pages

    assert [row["id"] for row in run(read_pages(ask, page=2))] == [1, 2, 3]


@pytest.mark.parametrize("fields", [{"limit": 0}, {"limit": PEERS_PAGE_MAX + 1}, {"offset": -1}])
def test_a_page_request_is_bounded(fields):
    with pytest.raises(SchemaError, match="peers"):
        Peers(**fields)


def test_a_peer_list_holds_at_most_one_page():
    with pytest.raises(SchemaError, match="peer_list.rows"):
        PeerList(rows=[{"id": i} for i in range(PEERS_PAGE_MAX + 1)], total=PEERS_PAGE_MAX + 1)


def test_bootstrap_answers_one_page_with_the_total_and_the_reader_gets_all_rows():
    async def body():
        service = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0"))
        try:
            for i in range(7):
                service.registry.join(OFFER, address=f"127.0.0.1:{7001 + i}", now=service.clock())

            async def ask(offset: int, limit: int) -> PeerList:
                return await service.rpc_peers(Envelope.of(Peers(offset=offset, limit=limit), offset + 1, "reader"))

            page = await ask(2, 3)
            beyond = await ask(10, 3)
            every = await read_pages(ask, page=3)
        finally:
            await service.stop()
        return page, beyond, every

    page, beyond, every = run(body())

    assert [row["id"] for row in page.rows] == [3, 4, 5] and page.total == 7
    assert beyond.rows == [] and beyond.total == 7
    assert [row["id"] for row in every] == list(range(1, 8))
