"""Hand-made token batches for the tiny-model tests, shaped as `atlas_p2p.data.collate` makes them."""

import torch

from atlas_p2p.models import SEQ_CLS


def padded_batches(task: str, n: int, rows: int, length: int, vocab: int, num_labels: int, seed: int = 1) -> list[dict]:
    """`n` batches of `rows` rows of `length` token ids drawn from [3, vocab), row 0 left-padded
    by 2 (id 0, mask 0). Labels: a class in [0, num_labels) per row for seq_cls, else the ids
    with the padding set to -100 (ignored by the loss)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (rows, length), generator=gen)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
        labels = (
            torch.randint(0, num_labels, (rows,), generator=gen)
            if task == SEQ_CLS
            else ids.masked_fill(mask == 0, -100)
        )
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
