"""The planner's inputs shared by the planning, coordinator, capabilities and memory tests.

A tiny GPT-2 shape (4 blocks, hidden 64, vocabulary 1000: about 8.1 MB to train whole,
about 3.6 MB for an owner at split 2) and the workload it trains with. Budgets in those
tests are derived from these two, so they sit just above or below a planner threshold.
"""

from atlas_p2p import memory as M

SHAPE = M.ModelShape(
    "gpt2",
    "gpt2",
    "causal_lm",
    num_layers=4,
    hidden=64,
    heads=4,
    kv_heads=4,
    head_dim=16,
    intermediate=256,
    vocab_size=1000,
    max_positions=128,
)
WORK = M.Workload(batch=4, seq_len=32)
