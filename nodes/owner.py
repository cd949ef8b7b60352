"""The owner's side of a split step as an async shell: one round of steps, then its contribution.

The math is atlas_p2p.training.OwnerSession (forward, finish, backward, local_step,
contribution); this module moves its tensors over the wire (two-part: `forward` with labels
-> `backward`; u-shape: `forward` without labels -> `hidden`, head and loss here,
`u_backward` -> `backward`) and turns what can go wrong into values the
node runtime acts on:

- `HelperFailed`: the helper missed a step's deadline or cannot serve (the runtime reports
  it to the bootstrap, waits for a new helper, rolls back and replays the round);
- `VersionBehind`: the helper runs a newer base (the runtime catches up from the anchor);
- `HistoryDiffers`: the helper asked the anchor, and this owner's base at its version is
  not the anchor's (the runtime re-syncs onto the anchor's history: ClusterSync.resync).
A helper answering `replay` (it lost this owner's server-side adapter, or a new helper)
makes the owner roll back and replay the round from step 0 here, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from atlas_p2p.aggregation import Contribution
from atlas_p2p.training import OwnerForward, OwnerSession
from nodes.collaborators import Link
from nodes.config import TrainConfig
from nodes.executor import TorchExecutor
from nodes.wireconv import factors_from_wire, tensor_from_wire, tensor_to_wire
from transport.messages import Backward, Forward, Hidden, Message, ReturnGet, RoundBegin, ServerAdapterMsg, UBackward
from transport.rpc import RpcError, RpcTimeout

log = logging.getLogger("atlas.owner")

MAX_REPLAYS = 3


class HelperFailed(Exception):
    def __init__(self, helper: int, why: str) -> None:
        super().__init__(f"helper {helper}: {why}")
        self.helper, self.why = helper, why


class VersionBehind(Exception):
    """The helper is on a newer base version than this owner."""


class HistoryDiffers(Exception):
    """The helper found that this owner's base is not its cluster anchor's history (re-sync)."""


@dataclass
class RoundResult:
    contribution: Contribution
    loss: float | None  # mean loss over the round's steps
    steps: int
    seconds: float


class OwnerRunner:
    """Runs rounds of one OwnerSession against the helper of the current assignment.

    Collaborators: `link` (metered calls to the helper), `executor` (every torch call), and
    from `train` the step deadline and the emulated step delay.
    """

    def __init__(
        self,
        link: Link,
        executor: TorchExecutor,
        session: OwnerSession,
        train: TrainConfig,
        *,
        owner_id: int,
        cluster: int,
        helper: int | None,
        helper_address: str | None,
        ranks: dict[str, int],
        base_digest: str,
    ) -> None:
        self.link = link
        self.executor = executor
        self.session = session
        self.step_timeout_s = train.step_timeout_s
        self.step_delay_s = train.step_delay_s
        self.wire_bf16 = train.wire_bf16
        self.owner_id = owner_id
        self.cluster = cluster
        self.helper = helper
        self.helper_address = helper_address
        self.ranks = dict(ranks)
        self.base_digest = base_digest  # this node's base (a helper on another base refuses round_begin)

    async def _call(self, body: Message, timeout: float) -> Message:
        """One request to the helper; `not_serving` (its assignment lags ours) is retried until the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self._call_once(body, max(0.05, deadline - time.monotonic()))
            except RpcError as exc:
                if exc.code != "not_serving" or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _call_once(self, body: Message, timeout: float) -> Message:
        if self.helper_address is None:  # the assignment named no address for it: nothing to call
            raise HelperFailed(self.helper, "the assignment gives no address for this helper")
        try:
            return await self.link.call(self.helper_address, body, timeout=timeout)
        except RpcTimeout:
            raise HelperFailed(self.helper, f"no answer to {type(body).TYPE} within {timeout:g} s") from None
        except RpcError as exc:
            if exc.code == "version":
                raise VersionBehind(exc.message) from None
            if exc.code == "history":
                raise HistoryDiffers(exc.message) from None
            if exc.code in ("replay", "not_serving"):
                raise
            raise HelperFailed(self.helper, f"{type(body).TYPE} refused: {exc}") from None

    async def _begin(self) -> None:
        s = self.session
        await self._call(
            RoundBegin(
                owner_id=self.owner_id,
                cluster=self.cluster,
                round=s.round,
                split=s.config.split,
                ranks=self.ranks,
                seed=s.seed,
                lr=s.config.lr,
                mode=s.config.mode,
                base_version=s.version,
                base_digest=self.base_digest,
                base_chain=s.base.chain,
            ),
            self.step_timeout_s,
        )

    async def _split_steps(self, batches: list[dict]) -> None:
        s, run, timeout = self.session, self.executor.run, self.step_timeout_s
        await self._begin()
        for batch in batches:
            fwd = await run(s.forward, batch)
            body = Forward(
                step=fwd.step,
                activations=tensor_to_wire(fwd.activations, self.wire_bf16),
                attention_mask=fwd.attention_mask.cpu().numpy(),
                labels=None if fwd.labels is None else fwd.labels.cpu().numpy(),
                base_version=s.version,
                owner_id=self.owner_id,
                cluster=self.cluster,
                round=fwd.round,
            )
            reply = await self._call(body, timeout)
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            loss = None
            if s.config.mode == "u-shape":  # u-shape: head and loss here, then the helper's backward
                loss, reply = await self._u_finish(fwd, reply, timeout)
            if not isinstance(reply, Backward) or reply.step != fwd.step:
                raise HelperFailed(self.helper, f"answered step {fwd.step} with {type(reply).TYPE}")
            try:
                await run(s.backward, tensor_from_wire(reply.grad), reply.loss if loss is None else loss)
            except ValueError as exc:  # a malformed gradient: this helper is not to be trusted
                raise HelperFailed(self.helper, f"sent a bad gradient ({exc})") from None

    async def _u_finish(self, fwd: OwnerForward, reply: Message, timeout: float) -> tuple[float, Message]:
        """u-shape: the helper's hidden states -> final norm + head + loss here (labels never leave)
        -> `u_backward` with ∂L/∂hidden; returns (loss, the helper's `backward` reply)."""
        s = self.session
        if not isinstance(reply, Hidden) or reply.step != fwd.step:
            raise HelperFailed(self.helper, f"answered u-shape step {fwd.step} with {type(reply).TYPE}")
        try:
            loss, grad = await self.executor.run(s.finish, tensor_from_wire(reply.hidden))
        except ValueError as exc:  # malformed hidden states: this helper is not to be trusted
            raise HelperFailed(self.helper, f"sent bad hidden states ({exc})") from None
        body = UBackward(
            step=fwd.step,
            grad=tensor_to_wire(grad, self.wire_bf16),
            base_version=s.version,
            owner_id=self.owner_id,
            cluster=self.cluster,
            round=fwd.round,
        )
        return loss, await self._call(body, timeout)

    async def _returned(self) -> tuple[dict, dict]:
        s = self.session
        reply = await self._call(
            ReturnGet(owner_id=self.owner_id, cluster=self.cluster, round=s.round), self.step_timeout_s
        )
        if (
            not isinstance(reply, ServerAdapterMsg)
            or reply.owner_id != self.owner_id
            or reply.round != s.round
            or reply.steps != s.step
        ):
            raise HelperFailed(self.helper, "returned an adapter of another owner, round or step count")
        try:
            return factors_from_wire(reply.tensors, reply.scalings)
        except ValueError as exc:
            raise HelperFailed(self.helper, f"returned a malformed adapter ({exc})") from None

    async def train_round(self, batches: list[dict]) -> RoundResult:
        """E steps of the current round on `batches`, then the contribution (closing the round)."""
        s, run = self.session, self.executor.run
        started = time.perf_counter()
        if s.local:
            for batch in batches:
                await run(s.local_step, batch)
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
            contribution = await run(s.contribution)
        else:
            for attempt in range(MAX_REPLAYS + 1):
                try:
                    await self._split_steps(batches)
                    helper_factors, helper_dense = await self._returned()
                    break
                except RpcError as exc:  # code 'replay': the helper lost our round
                    if exc.code != "replay":
                        await run(s.rollback)
                        raise HelperFailed(self.helper, f"does not serve this owner ({exc.message})") from None
                    log.info("helper %s asks for a replay of round %d (%s)", self.helper, s.round, exc.message)
                    await run(s.rollback)
                    if attempt == MAX_REPLAYS:
                        raise HelperFailed(self.helper, "keeps asking for replays") from None
            try:
                contribution = await run(s.contribution, None, helper_factors, helper_dense)
            except ValueError as exc:
                await run(s.rollback)
                raise HelperFailed(self.helper, f"returned an unusable adapter ({exc})") from None
        losses = s.losses
        loss = sum(losses) / len(losses) if losses else None
        return RoundResult(contribution, loss, s.step, time.perf_counter() - started)
