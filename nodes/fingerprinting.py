"""The wire side of a fingerprint across a cut (DESIGN 2.2 and 6; docs/RUNTIME.md "Fingerprint").

The torch side is atlas_p2p.training.fingerprinting (`node_fingerprint`, `cut_loss`). Here a
node whose first assignment names a provisional helper reaches that helper with `probe`
messages: two-part, one `probe` with labels answered by `backward` (∂L/∂h, and a
classifier head's gradient); u-shape, a
`probe` without labels answered by `hidden` (z), then a `probe` with ∂L/∂z answered by
`backward`. A reply of another type is a ValueError, as is a malformed tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from atlas_p2p.fingerprint import LossFn
from atlas_p2p.training.fingerprinting import cut_loss
from transport.messages import Backward, Hidden, Message, Probe

ProbeCall = Callable[[Message], Message]  # Probe body -> reply body (blocks; raises on failure)


@dataclass(frozen=True)
class ProbeHelper:
    """atlas_p2p.training.fingerprinting.CutHelper over `probe` messages to one helper."""

    call: ProbeCall
    owner_id: int
    split: int

    def _ask(
        self, kind: type[Message], activations: np.ndarray, attention_mask: np.ndarray, **extra: np.ndarray
    ) -> Message:
        reply = self.call(
            Probe(
                owner_id=self.owner_id,
                split=self.split,
                activations=activations,
                attention_mask=attention_mask,
                **extra,
            )
        )
        if not isinstance(reply, kind):
            raise ValueError(f"provisional helper answered {type(reply).__name__}, expected {kind.__name__}")
        return reply

    def grad(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        reply = self._ask(Backward, activations, attention_mask, labels=labels)
        return reply.grad, dict(reply.head_grads or {})

    def hidden(self, activations: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._ask(Hidden, activations, attention_mask).hidden

    def vjp(self, activations: np.ndarray, attention_mask: np.ndarray, hidden_grad: np.ndarray) -> np.ndarray:
        return self._ask(Backward, activations, attention_mask, hidden_grad=hidden_grad).grad


def split_loss(split: int, mode: str, call: ProbeCall, owner_id: int) -> LossFn:
    """loss_fn for atlas_p2p.fingerprint across a cut at ``split``, the helper reached by ``call``."""
    return cut_loss(split, mode, ProbeHelper(call, owner_id, split))
