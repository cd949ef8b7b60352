"""What every row of the bootstrap's peer list carries: the `peers` reply and
`atlas-node peers --json` print the same rows."""

PEER_ROW_KEYS = frozenset(
    {
        "id",
        "address",
        "memory_bytes",
        "bandwidth_bps",
        "status",
        "cluster",
        "split",
        "helper",
        "last_seen",
        "role",
        "state",
        "round",
        "base_version",
    }
)
