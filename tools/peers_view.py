"""`atlas-node peers`: fetch the peer table from a bootstrap and render it for people."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from transport.messages import PEERS_PAGE_DEFAULT, PeerList

# (header, row key) in display order; `last_seen_ago_s` is computed by the bootstrap
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ID", "id"),
    ("STATUS", "status"),
    ("ADDRESS", "address"),
    ("REACH", "reachable"),
    ("VIA", "via"),
    ("MEMORY", "memory_bytes"),
    ("BANDWIDTH", "bandwidth_bps"),
    ("ROLE", "role"),
    ("STATE", "state"),
    ("CLUSTER", "cluster"),
    ("SPLIT", "split"),
    ("PSI", "psi"),
    ("DP EPS", "dp_epsilon"),
    ("HELPER", "helper"),
    ("RANKS", "ranks"),
    ("ANCHOR", "anchor"),
    ("ROUND", "round"),
    ("BASE", "base_version"),
    ("DIGEST", "base_digest"),
    ("LAST SEEN", "last_seen_ago_s"),
    ("REASON", "reason"),
)


class PeersRefused(RuntimeError):
    """The bootstrap answered, but not with a peer list."""


async def read_pages(
    ask: Callable[[int, int], Awaitable[PeerList]], page: int = PEERS_PAGE_DEFAULT, limit: int | None = None
) -> list[dict]:
    """Every row of the peer table (or the first `limit`), one `peers` request per page:
    `ask(offset, n)` returns up to n rows from offset. Pages follow each other until `total`
    rows (as the latest page counts them) are read or a page comes back empty. A table that
    changes while it is read may shift a page: a row seen twice is kept once."""
    rows: list[dict] = []
    seen: set[object] = set()
    offset = 0
    while limit is None or len(rows) < limit:
        reply = await ask(offset, page if limit is None else min(page, limit - len(rows)))
        for row in reply.rows:
            if row.get("id") not in seen:
                seen.add(row.get("id"))
                rows.append(row)
        offset += len(reply.rows)
        if not reply.rows or offset >= reply.total:
            break
    return rows if limit is None else rows[:limit]


async def fetch_peers(
    bootstrap: str, timeout: float, token: str | None = None, limit: int | None = None
) -> list[dict[str, Any]] | None:
    """Ask `bootstrap` for all its rows (or the first `limit`), page by page (`read_pages`);
    None when a page does not come within `timeout`.

    With the swarm's join token (its text) the request goes over CURVE to the key the token
    names and carries the token's secret; without, a plain request (an insecure swarm)."""
    from transport.messages import Peers
    from transport.rpc import RpcClient, RpcError, RpcTimeout
    from transport.security import JoinToken, Keypair

    parsed = None if token is None else JoinToken.parse(token)
    client = await RpcClient.create(
        f"peers-{uuid.uuid4().hex[:8]}", keypair=None if parsed is None else Keypair.generate()
    )
    if parsed is not None:
        client.set_server_key(bootstrap, parsed.server_key)
    try:
        secret = "" if parsed is None else parsed.secret
        rows = await read_pages(
            lambda offset, n: client.call(
                bootstrap, Peers(offset=offset, limit=n, token=secret), timeout=timeout, expect=PeerList
            ),
            limit=limit,
        )
    except RpcTimeout:
        return None
    except RpcError as exc:
        raise PeersRefused(f"bootstrap {bootstrap} refused the request: {exc}") from None
    finally:
        await client.stop()
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "memory_bytes":  # decimal megabytes, whole ones (the one place units are shown)
        mb = int(value) // 10**6
        return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"
    if key == "bandwidth_bps":
        mbps = value / 1e6
        return f"{mbps / 1000:g} Gbps" if mbps >= 1000 else f"{mbps:g} Mbps"
    if key == "anchor":
        return "yes" if value else ""
    if key == "reachable":
        return "yes" if value else "NO"
    if key in ("psi", "dp_epsilon"):
        return f"{float(value):.3g}"
    if key == "base_digest":
        return str(value)[:12]  # short form; --json has the whole sha256
    if key == "reason":
        text = str(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if key == "last_seen_ago_s":
        seconds = max(0.0, float(value))
        if seconds < 120:
            return f"{seconds:.0f}s ago"
        if seconds < 7200:
            return f"{seconds / 60:.0f}m ago"
        return f"{seconds / 3600:.0f}h ago"
    return str(value)


def format_peer_table(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned text table of peer rows plus a one-line summary ("3 peers: 2 alive, 1 dead")."""
    if not rows:
        return "no peers yet"
    cells = [[header for header, _ in _COLUMNS]]
    cells += [[_cell(key, row.get(key)) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    counts = Counter(str(row.get("status")) for row in rows)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines.append(f"{len(rows)} peer{'s' if len(rows) != 1 else ''}: {summary}")
    return "\n".join(lines)
