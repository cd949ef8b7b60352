"""The helper's side of a split step as an async shell (docs/RUNTIME.md): RPC handlers only.

Handlers: `round_begin` (prepare an owner's server-side adapter for a round), `forward`
(two-part, with labels: blocks[s:] + head + loss, backward, AdamW step -> `backward`;
u-shape, without labels: blocks[s:L] -> `hidden`), `u_backward` (u-shape: the owner's
gradient of those hidden states, backward, AdamW step -> `backward`) and `return_get` (hand the round's server-side factors back -> `server_adapter`). The math is
atlas_p2p.training.HelperSession, one replica per cluster served (HelperPool); every torch
call runs in the node's executor thread.

A request must come from the owner it names (the key of its connection: `unauthorized`
otherwise); a request from an owner this node is not assigned to serve is refused (`not_serving`), and a
`round_begin` whose base digest is not this node's base is refused (`base_mismatch`): the
owner reports the helper like a failed one and gets another.
The base version is checked on every forward: a replica behind the owner first pulls the
missing patches from that owner (else from the cluster's anchor, which may be dead) (digests and chain checked while folding); a
replica ahead answers `version` and the owner catches up. A replica at the owner's version
on another chain (`round_begin` states the owner's) settles it with the anchor: rebuilt from
the owner if the owner's chain is the anchor's, else `history` (the owner re-syncs).
Errors map to codes:
ReplayNeeded -> `replay` (the owner replays its round from step 0), VersionMismatchError
-> `version`, a malformed tensor -> `bad_request`; nothing a peer sends crashes the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from atlas_p2p.models.base import short
from atlas_p2p.models.sharing import copy_model
from atlas_p2p.training import HelperConfig, HelperPool, HelperSession, ReplayNeeded, VersionMismatchError, probe
from atlas_p2p.versioning import DigestMismatchError
from nodes.collaborators import AssignmentSource, LocalNode, PatchSource
from nodes.executor import TorchExecutor
from nodes.wireconv import factors_to_wire, is_bf16, tensor_from_wire, tensor_to_wire
from transport.messages import Backward, Envelope, Hidden, ServerAdapterMsg
from transport.rpc import Handler, RpcError

log = logging.getLogger("atlas.helper")


class HelperService:
    """Serves the owners of this node's assignment (`owners` entries of the assignment).

    Collaborators: `executor` (every torch call), `assignments` (whom to serve), `local` (this node's id and base, None while starting)
    and `patches` (a replica behind an owner pulls them from the cluster's anchor).
    """

    def __init__(
        self, executor: TorchExecutor, assignments: AssignmentSource, local: LocalNode, patches: PatchSource
    ) -> None:
        self.executor = executor
        self.assignments = assignments
        self.local = local
        self.patches = patches
        self.pool = HelperPool()
        self._locks: dict[int, asyncio.Lock] = {}
        self.steps_served = 0
        # what arrived, for the summary: requests by type, and forwards that carried labels
        # (in a u-shape swarm this stays 0: labels never leave their owner)
        self.requests: Counter[str] = Counter()
        self.labels_received = 0

    # ---- plumbing --------------------------------------------------------------------
    def _find(self, owner_id: int) -> dict[str, Any] | None:
        a = self.assignments.assignment
        for o in a.owners if a is not None else []:
            if int(o.get("owner", -1)) == owner_id:
                return o
        return None

    async def _owner_plan(self, owner_id: int) -> dict[str, Any]:
        """This owner's entry in our assignment (refetched once if absent: ours may be stale)."""
        me = self.local.node_id
        if self.local.base_model is None:  # still building the model after the welcome
            raise RpcError("not_serving", f"node {me} is still starting")
        plan = self._find(owner_id)
        if plan is None and me is not None:
            await self.assignments.fetch_assignment()
            plan = self._find(owner_id)
        if plan is not None:
            return plan
        raise RpcError("not_serving", f"node {me} is not assigned to serve owner {owner_id}")

    def _replica(self, cluster: int) -> HelperSession:
        key = str(cluster)
        if key not in self.pool.clusters:
            model = copy_model(self.local.base_model)  # views a shared base, if any
            self.pool.add(HelperSession(model, HelperConfig(cluster=key)))
        return self.pool.get(key)

    async def _sync(
        self, cluster: int, replica: HelperSession, wanted: int, owner: int, chain: str = ""
    ) -> HelperSession:
        """Bring the replica to the owner's version `wanted` (pull the patches from that owner,
        which holds them, else from the anchor); the replica to serve it with. `chain`: the
        owner's chain at `wanted`, when it states it (`round_begin`)."""
        lock = self._locks.setdefault(cluster, asyncio.Lock())
        async with lock:
            forked = False
            if replica.version < wanted:
                records = await self.patches(cluster, replica.version, owner)
                try:
                    for r in records:
                        await self.executor.run_urgent(
                            replica.fold, r.patch, version=r.version, digest=r.digest, chain=r.chain
                        )
                except DigestMismatchError:
                    forked = True  # the owner's patches do not continue this replica's history
                else:
                    log.info("helper replica of cluster %d caught up to version %d", cluster, replica.version)
                chain = chain or next((r.chain for r in records if r.version == wanted), "")
            if forked or (chain and replica.version == wanted and replica.base.chain != chain):
                replica = await self._settle_fork(cluster, wanted, owner, chain)
        if replica.version != wanted:
            raise RpcError(
                "version",
                f"helper replica of cluster {cluster} is at version {replica.version}, the request at {wanted}",
            )
        return replica

    async def _settle_fork(self, cluster: int, wanted: int, owner: int, chain: str) -> HelperSession:
        """The replica's history and the owner's differ: the one that is not the anchor's gives
        way. The owner's: `history` (it re-syncs, then begins again). The replica's: it is built
        again from the owner's patches (the owners it served replay their round)."""
        try:
            anchors = await self.patches(cluster, wanted - 1, None)  # the anchor's record of version `wanted`
        except (RpcError, ValueError) as exc:
            raise RpcError(
                "history", f"cluster {cluster}: histories differ and the anchor cannot be asked ({exc})"
            ) from None
        theirs = next((r.chain for r in anchors if r.version == wanted), None)
        if not chain or theirs != chain:
            raise RpcError("history", f"owner {owner}'s base version {wanted} is not its cluster anchor's: re-sync")
        log.warning(
            "helper replica of cluster %d left the anchor's history; rebuilding it from owner %d", cluster, owner
        )
        self.pool.remove(str(cluster))
        replica = self._replica(cluster)
        try:
            for r in await self.patches(cluster, 0, owner):
                await self.executor.run_urgent(replica.fold, r.patch, version=r.version, digest=r.digest, chain=r.chain)
        except (RpcError, ValueError) as exc:
            self.pool.remove(str(cluster))  # half built: the next request starts over
            raise RpcError("version", f"helper replica of cluster {cluster} could not be rebuilt ({exc})") from None
        return replica

    async def _torch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await self.executor.run_urgent(fn, *args, **kwargs)
        except ReplayNeeded as exc:
            raise RpcError("replay", str(exc)) from None
        except VersionMismatchError as exc:
            raise RpcError("version", str(exc)) from None
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None

    # ---- handlers -------------------------------------------------------------------
    def _check_base(self, owner_id: int, digest: str) -> None:
        """Serve only an owner that runs this node's base (atlas_p2p.models.base digest)."""
        mine = self.local.base_digest
        if mine is None:
            raise RpcError("not_serving", f"node {self.local.node_id} is still starting")
        if digest != mine:
            raise RpcError(
                "base_mismatch",
                f"owner {owner_id} runs base {short(digest) if digest else '(none stated)'}, "
                f"helper {self.local.node_id} runs {short(mine)}: not serving it",
            )

    async def rpc_round_begin(self, env: Envelope) -> None:
        b = env.body
        await self.assignments.require_caller(env, b.owner_id)
        plan = await self._owner_plan(b.owner_id)
        self._check_base(b.owner_id, b.base_digest)
        if plan.get("cluster") is not None and int(plan["cluster"]) != b.cluster:
            raise RpcError("bad_request", f"owner {b.owner_id} is in cluster {plan['cluster']}, not {b.cluster}")
        replica = self._replica(b.cluster)
        for other in self.pool.clusters:  # an owner that moved cluster is dropped from the old replica
            if other != str(b.cluster):
                await self.executor.run_urgent(self.pool.get(other).drop, b.owner_id)
        replica = await self._sync(b.cluster, replica, b.base_version, b.owner_id, b.base_chain)
        await self._torch(replica.begin, b.owner_id, b.round, b.split, dict(b.ranks), b.seed, mode=b.mode, lr=b.lr)

    async def rpc_forward(self, env: Envelope) -> Hidden | Backward:
        b = env.body
        await self.assignments.require_caller(env, b.owner_id)
        self.requests["forward"] += 1
        self.labels_received += b.labels is not None
        await self._owner_plan(b.owner_id)
        replica = self._replica(b.cluster)
        replica = await self._sync(b.cluster, replica, b.base_version, b.owner_id)
        bf16, activations = is_bf16(b.activations), tensor_from_wire(b.activations)  # answered in its dtype
        if b.labels is None:  # u-shape: blocks[s:L] only, the owner keeps head, labels and loss
            out = await self._torch(
                replica.u_forward,
                b.owner_id,
                b.round,
                b.step,
                activations,
                b.attention_mask,
                base_version=b.base_version,
            )
            reply = Hidden(step=b.step, hidden=tensor_to_wire(out.detach(), bf16))
        else:
            result = await self._torch(
                replica.step,
                b.owner_id,
                b.round,
                b.step,
                activations,
                b.attention_mask,
                b.labels,
                base_version=b.base_version,
            )
            self.steps_served += 1
            reply = Backward(step=b.step, grad=tensor_to_wire(result.grad.detach(), bf16), loss=float(result.loss))
        return reply

    async def rpc_u_backward(self, env: Envelope) -> Backward:
        """u-shape, second half of a step: the owner's ∂L/∂hidden -> backward, AdamW step -> ∂L/∂activations."""
        b = env.body
        await self.assignments.require_caller(env, b.owner_id)
        self.requests["u_backward"] += 1
        await self._owner_plan(b.owner_id)
        replica = self._replica(b.cluster)
        replica = await self._sync(b.cluster, replica, b.base_version, b.owner_id)
        bf16 = is_bf16(b.grad)
        grad = await self._torch(
            replica.u_backward, b.owner_id, b.round, b.step, tensor_from_wire(b.grad), base_version=b.base_version
        )
        self.steps_served += 1
        return Backward(step=b.step, grad=tensor_to_wire(grad.detach(), bf16), loss=None)

    async def rpc_return_get(self, env: Envelope) -> ServerAdapterMsg:
        b = env.body
        await self.assignments.require_caller(env, b.owner_id)
        await self._owner_plan(b.owner_id)
        back = await self._torch(self._replica(b.cluster).return_adapter, b.owner_id, b.round)
        tensors, scalings = factors_to_wire(back.factors, back.dense)
        return ServerAdapterMsg(
            owner_id=b.owner_id, round=back.round, steps=back.steps, tensors=tensors, scalings=scalings
        )

    async def rpc_probe(self, env: Envelope) -> Hidden | Backward:
        """One micro-batch of another node's fingerprint across a cut, on the ORIGINAL base
        (atlas_p2p.training.probe): nothing here changes, so any node of the swarm may ask, for itself."""
        b = env.body
        await self.assignments.require_caller(env, b.owner_id)
        self.requests["probe"] += 1
        base = self.local.base_model
        if base is None:
            raise RpcError("not_serving", f"node {self.local.node_id} is still starting")
        if b.labels is not None:
            grad, loss, head = await self._torch(
                probe.probe_grad, base, b.split, b.activations, b.attention_mask, b.labels
            )
            head_grads = {n: g.cpu().numpy() for n, g in head.items()}
            reply = Backward(step=0, grad=grad.cpu().numpy(), loss=loss, head_grads=head_grads)
        elif b.hidden_grad is None:
            hidden = await self._torch(probe.probe_hidden, base, b.split, b.activations, b.attention_mask)
            reply = Hidden(step=0, hidden=hidden.cpu().numpy())
        else:
            grad = await self._torch(probe.probe_vjp, base, b.split, b.activations, b.attention_mask, b.hidden_grad)
            reply = Backward(step=0, grad=grad.cpu().numpy(), loss=None)
        return reply

    def handlers(self) -> dict[str, Handler]:
        return {
            "round_begin": self.rpc_round_begin,
            "forward": self.rpc_forward,
            "u_backward": self.rpc_u_backward,
            "return_get": self.rpc_return_get,
            "probe": self.rpc_probe,
        }
