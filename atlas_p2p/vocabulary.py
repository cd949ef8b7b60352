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

# how a cluster's contributions become its round's patch (DESIGN 8, 9)
EXACT = "exact"  # the weighted mean of the updates, Σ p_k γ_k B_k A_k (stacked: no cross terms)
FEDAVG = "fedavg"  # SplitLoRA's factor-wise average, (Σ p_k B_k)(Σ p_k γ A_k): a baseline, not exact
MIRA = "mira"  # MIRA's personal adapters, pulled toward the cluster's mean each round: a baseline
MERGE_RULES = (EXACT, FEDAVG, MIRA)

# what a task fingerprint is the gradient in (atlas_p2p.fingerprint)
PROBE_LORA = "lora"  # a rank-4 LoRA on block 0's attention, plain mean loss
PROBE_HEAD = "head"  # a classifier's head, class-balanced loss (pretrained classifiers)
FINGERPRINT_PROBES = (PROBE_LORA, PROBE_HEAD)

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
    "EXACT",
    "FEDAVG",
    "FINGERPRINT_PROBES",
    "HELPER",
    "MERGE_RULES",
    "MIRA",
    "NODE_STATES",
    "OWNER",
    "PROBE_HEAD",
    "PROBE_LORA",
    "ROLES",
    "SEQ_CLS",
    "SPLIT_MODES",
    "TASKS",
    "TWO_PART",
    "U_SHAPE",
    "WAITING",
    "WHOLE",
]
