"""The results a node writes under its `--out`, and the figures read back from them.

Bytes by kind (DESIGN 5): the RPC layer counts the encoded bytes of every message a
node sends by message type; `bytes_by_kind` folds those counts into the five kinds.
"""

from __future__ import annotations

from collections.abc import Mapping

KINDS = ("activations", "gradients", "adapters", "fingerprints", "control")

# message type -> kind of the bytes it carries; every other type is control
KIND_OF = {
    "forward": "activations",
    "backward": "gradients",
    "hidden": "activations",  # u-shape: the helper's output hidden states
    "u_backward": "gradients",  # u-shape: the owner's gradient of those hidden states
    "server_adapter": "adapters",
    "contribution": "adapters",
    "patches": "adapters",
    "fingerprint": "fingerprints",
    "probe": "fingerprints",  # owner activations of a fingerprint computed across a cut
}


def bytes_by_kind(*by_type: Mapping[str, int]) -> dict[str, int]:
    """Sum byte counts keyed by message type into the five kinds (all five present)."""
    totals = dict.fromkeys(KINDS, 0)
    for counts in by_type:
        for msg_type, n in counts.items():
            totals[KIND_OF.get(msg_type, "control")] += int(n)
    return totals

