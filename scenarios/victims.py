"""Whom a scenario kills, chosen from a peer table, and what the records say happened next.

Both halves are pure functions over plain rows, so the demo and the churn scenario can
only claim what a table or a record shows:

- `choose_victims` reads the rows of `atlas-node peers --json` taken at kill time. A
  helper counts as serving an owner only when that owner's row is planned (role `owner`,
  a cluster) and names it in its `helper` column; the provisional helper of a node still
  waiting for its fingerprint does not count. Each victim carries the reason it was
  picked, in words taken from the table.
- `kill_outcomes` matches the bootstrap's repair events (`coordinator.json`) and the
  owners' own failure reports (summary.json or checkpoint `repairs`) against the victims;
  `describe_outcome` and `short_claim` turn one outcome into what the scenario prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atlas_p2p.vocabulary import OWNER, WHOLE

LIVE = ("alive", "suspect")  # peer-table statuses of a node that may still be running
KILL_CAUSES = ("dead", "failed")  # coordinator causes that follow a SIGKILL (swept dead, or reported by an owner)
REPAIRED_KINDS = ("repair", "fallback")  # repair events that gave the owner a new helper

Row = Mapping[str, Any]


def _live(row: Row) -> bool:
    return row.get("status") in LIVE


def plan_exists(rows: Sequence[Row]) -> bool:
    """Whether the bootstrap's plan is in the table: a live row is clustered and trains
    (role whole or owner). Before the first plan no row has a cluster."""
    return any(_live(r) and r.get("cluster") is not None and r.get("role") in (WHOLE, OWNER) for r in rows)


def serving_helpers(rows: Sequence[Row]) -> dict[int, list[int]]:
    """helper id -> ids of the live planned owners whose `helper` column names it.

    A planned owner has role `owner` and a cluster; a node waiting for its fingerprint
    (role `waiting`, no cluster) names only a provisional helper and is left out."""
    serving: dict[int, list[int]] = {}
    for row in rows:
        helper = row.get("helper")
        planned = row.get("role") == OWNER and row.get("cluster") is not None
        if helper is not None and planned and _live(row) and helper != row.get("id"):
            serving.setdefault(int(helper), []).append(int(row["id"]))
    return serving


@dataclass(frozen=True)
class Victim:
    """A node chosen to be killed, with what the table said about it when it was chosen."""

    name: str
    node_id: int
    serves: tuple[int, ...]  # owners that named it as their helper
    why: str  # the reason, in words from the table

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.node_id, "serves": list(self.serves), "why": self.why}


def _name_list(ids: Iterable[int], names_by_id: Mapping[int, str]) -> str:
    return ", ".join(f"{names_by_id.get(i, '?')} (id {i})" for i in ids)


def choose_victims(
    rows: Sequence[Row],
    names_by_id: Mapping[int, str],
    pure_helpers: set[str],
    count: int,
    eligible: set[int] | None = None,
) -> list[Victim]:
    """`count` nodes to kill, from `rows` read at kill time.

    Order: helpers serving at least one owner (pure helpers first, then data nodes that
    also serve, their cluster's anchor last; more owners first), alternating with data
    nodes that are not their cluster's anchor and leave another live member behind; a
    data node whose helper was already chosen comes after the others (its death would
    leave that repair nobody to repair). Whatever is still missing is filled with any
    other live non-anchor node that keeps every cluster populated. `eligible` (None: all)
    limits who may be picked, e.g. to nodes in the middle of their training."""
    alive = {int(r["id"]): r for r in rows if _live(r) and int(r["id"]) in names_by_id}
    pickable = set(alive) if eligible is None else set(alive) & set(eligible)
    serving = serving_helpers(rows)

    def pure(node_id: int) -> bool:
        return names_by_id[node_id] in pure_helpers

    helpers = sorted(
        (h for h in serving if h in pickable),
        key=lambda h: (not pure(h), bool(alive[h].get("anchor")), -len(serving[h]), h),
    )
    members: dict[Any, set[int]] = {}
    for node_id, row in alive.items():
        if not pure(node_id) and row.get("cluster") is not None:
            members.setdefault(row["cluster"], set()).add(node_id)
    data_nodes = sorted(
        (i for i, r in alive.items() if i in pickable and not pure(i) and not r.get("anchor")),
        key=lambda i: (i in serving, -len(members.get(alive[i].get("cluster"), ())), -i),
    )
    chosen: list[int] = []

    def keeps_cluster(node_id: int) -> bool:
        cluster = alive[node_id].get("cluster")
        if pure(node_id) or cluster is None:
            return True
        return len(members.get(cluster, set()) - set(chosen) - {node_id}) >= 1

    def loses_its_helper(node_id: int) -> bool:
        return alive[node_id].get("helper") in chosen

    queues = [helpers, data_nodes]
    turn = 0
    while len(chosen) < count and any(queues):
        queue = queues[turn % 2]
        turn += 1
        while queue:  # a candidate refused now stays refused: the checks only tighten as `chosen` grows
            candidate = queue.pop(0)
            if candidate not in chosen and keeps_cluster(candidate) and not loses_its_helper(candidate):
                chosen.append(candidate)
                break
    for node_id in sorted(alive, reverse=True):  # anything else alive that keeps every cluster populated
        if len(chosen) >= count:
            break
        if (
            node_id in pickable
            and node_id not in chosen
            and keeps_cluster(node_id)
            and not alive[node_id].get("anchor")
        ):
            chosen.append(node_id)
    return [
        Victim(names_by_id[i], i, tuple(serving.get(i, ())), _why(i, alive, serving, members, pure, names_by_id))
        for i in chosen
    ]


def _why(
    node_id: int,
    alive: Mapping[int, Row],
    serving: Mapping[int, list[int]],
    members: Mapping[Any, set[int]],
    pure: Callable[[int], bool],
    names_by_id: Mapping[int, str],
) -> str:
    """Why `node_id` was picked, from its row (role, cluster, anchor) and its owners' rows."""
    row = alive[node_id]
    if pure(node_id):
        what = "pure helper (no data)"
    else:
        cluster = row.get("cluster")
        what = f"data node, role {row.get('role')}, cluster {cluster}" + (", its anchor" if row.get("anchor") else "")
        if cluster is not None:
            others = len(members.get(cluster, set()) - {node_id})
            what += f", {others} other live member{'s' if others != 1 else ''} in its cluster"
    owners = serving.get(node_id)
    if owners:
        return f"{what}, helper of {_name_list(owners, names_by_id)}"
    return f"{what}, serves nobody"


# --------------------------------------------------------------------------- what happened


def kill_outcomes(
    victims: Sequence[Victim],
    events: Sequence[Mapping[str, Any]],
    owner_reports: Mapping[int, Sequence[int]],
) -> list[dict[str, Any]]:
    """One JSON record per victim of what the records show after it died.

    `events`: coordinator.json `events` (owner, old_helper, new_helper, kind, cause);
    `owner_reports`: owner id -> helper ids in that owner's repair records. A record
    holds the victim (`name`, `id`, `why`), the owners it `served` when it was chosen, the
    bootstrap events whose old helper it is and whose cause follows a kill (dead or
    failed) that gave an owner a new helper (`repaired`) or none (`unpaired` owners), and
    the owners that reported it failed themselves (`reported_by`)."""
    outcomes = []
    for victim in victims:
        mine = [
            dict(e) for e in events if _int(e.get("old_helper")) == victim.node_id and e.get("cause") in KILL_CAUSES
        ]
        outcomes.append(
            {
                **victim.to_json(),
                "served": list(victim.serves),
                "repaired": [e for e in mine if e.get("kind") in REPAIRED_KINDS],
                "unpaired": [int(e["owner"]) for e in mine if e.get("kind") == "unpaired"],
                "reported_by": sorted(o for o, helpers in owner_reports.items() if victim.node_id in helpers),
            }
        )
    return outcomes


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def describe_outcome(outcome: Mapping[str, Any], names_by_id: Mapping[int, str]) -> str:
    """One sentence from a `kill_outcomes` record: what the victim was when it was chosen and
    what the records show happened to its owners."""
    head = f"{outcome['name']} (id {outcome['id']}) died"
    if not outcome["served"]:
        return f"{head}; it served no owner, so there was nothing to repair"
    parts = [f"{head} serving {_name_list(outcome['served'], names_by_id)}"]
    if outcome["repaired"]:
        moves = ", ".join(
            f"{names_by_id.get(int(e['owner']), '?')} -> {names_by_id.get(int(e['new_helper']), '?')} "
            f"(id {e['new_helper']}, {e['kind']}, cause {e['cause']})"
            for e in outcome["repaired"]
        )
        parts.append(f"the bootstrap re-paired {moves}")
    if outcome["unpaired"]:
        parts.append(f"{_name_list(outcome['unpaired'], names_by_id)} found no new helper and waited")
    if not outcome["repaired"] and not outcome["unpaired"]:
        parts.append("the bootstrap recorded no repair of its owners")
    if outcome["reported_by"]:
        parts.append(f"reported failed by {_name_list(outcome['reported_by'], names_by_id)}")
    return "; ".join(parts)


def short_claim(outcome: Mapping[str, Any], names_by_id: Mapping[int, str]) -> str:
    """The few words a closing summary says about one victim, from its `kill_outcomes` record."""
    if not outcome["served"]:
        return f"{outcome['name']} died serving nobody (no repair needed)"
    served = ", ".join(names_by_id.get(int(o), "?") for o in outcome["served"])
    head = f"{outcome['name']} (helper of {served}) died"
    owners = sorted({names_by_id.get(int(e["owner"]), "?") for e in outcome["repaired"]})
    if not owners:
        return f"{head} and none of its owners was re-paired"
    verb = "was" if len(owners) == 1 else "were"
    return f"{head} and {', '.join(owners)} {verb} re-paired (repairs {len(outcome['repaired'])})"
