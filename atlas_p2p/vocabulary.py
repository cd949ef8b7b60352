"""The words every layer shares: tasks, split modes, plan roles and node lifecycle states.

The algorithms, the wire schema (transport/messages.py) and the runtime all check
against these tuples, so a new word is added here once.
"""

from __future__ import annotations

# what a model is trained to do
CAUSAL_LM = "causal_lm"  # next-token prediction
SEQ_CLS = "seq_cls"  # one label per sequence
TASKS = (CAUSAL_LM, SEQ_CLS)

# how a model is cut between an owner and its helper (DESIGN 4)
TWO_PART = "two-part"  # owner runs blocks[:s], the helper the rest, head and loss
U_SHAPE = "u-shape"  # the owner also keeps the head and the labels
SPLIT_MODES = (TWO_PART, U_SHAPE)

# a node's role in a plan (atlas_p2p.planning)
WHOLE = "whole"  # trains the whole model alone; may also serve owners
OWNER = "owner"  # runs blocks[:split], paired with a helper
HELPER = "helper"  # no data: hosts later layers for owners
WAITING = "waiting"  # cannot train now; the plan's reason says why
ROLES = (WHOLE, OWNER, HELPER, WAITING)

# where a node is in its lifecycle, as its heartbeat reports it (docs/RUNTIME.md)
NODE_STATES = ("joining", "fingerprinting", "waiting", "training", "merging", "repairing", "done", "left")

__all__ = [
    "CAUSAL_LM",
    "HELPER",
    "NODE_STATES",
    "OWNER",
    "ROLES",
    "SEQ_CLS",
    "SPLIT_MODES",
    "TASKS",
    "TWO_PART",
    "U_SHAPE",
    "WAITING",
    "WHOLE",
]
