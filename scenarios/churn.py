"""Churn scenario: a swarm trains on 127.0.0.1 while some of its nodes are SIGKILLed.

    python scenarios/churn.py --nodes 8 --tasks 2 --kill 0.25 --json out.json
        [--restart FRACTION] [--rounds R] [--model tiny-gpt2] [--workdir DIR] [--seed S]

What it does, in order:
1. Writes synthetic data (atlas_p2p.synthetic): one task per data node, round-robin, with
   the `task` field in every record (the nodes never use it; only this script scores
   with it), plus a held-out eval file per node of the same task.
2. Starts a bootstrap and N `atlas-node join` processes through the CLI (scenarios.swarm)
   with mixed --memory budgets: per task one strong node that trains the whole model and
   can help, the others too small for the whole model (they need a helper), and for
   N >= 6 at least one pure helper without data (N // 4 of them).
3. Once the plan is in the peer table, SIGKILLs the --kill fraction of the N nodes in the
   middle of their training, chosen from a table read at kill time
   (scenarios.victims.choose_victims): helpers that serve planned owners first (pure
   helpers before data nodes that also serve), then data nodes that are neither their
   cluster's anchor nor its last member. Each kill is printed with its reason from
   that table.
4. Optionally starts the --restart fraction of the killed nodes again on the same --out
   (they resume from their checkpoint).
5. Waits (global --timeout, a progress line every few seconds) for every surviving data
   node to finish all rounds and exit, then lets the helpers go.
6. Reads every node's --out (tools.report) and the bootstrap's repair events, matches
   them against the victims (what each one served, who was re-paired to whom), writes the
   figures as JSON and checks acceptance: every survivor finished, no lost update, a
   bootstrap repair naming each killed helper as the old helper, ARI >= 0.9, each
   cluster's loss fell. Exit code 0 only when every check passes; the failing ones are named. The
   closing lines say only what the records show.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scenarios/churn.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_p2p.synthetic import SyntheticConfig, write_synthetic_jsonl  # noqa: E402
from atlas_p2p.validation import is_number, require_int  # noqa: E402
from scenarios.swarm import Swarm, SwarmError  # noqa: E402
from scenarios.victims import (  # noqa: E402
    Victim,
    choose_victims,
    describe_outcome,
    kill_outcomes,
    plan_exists,
    serving_helpers,
    short_claim,
)
from scenarios.waiting import WaitTimeout, wait_until  # noqa: E402
from tools import report  # noqa: E402
from tools.peers_view import format_peer_table  # noqa: E402

log = logging.getLogger("atlas.churn")

ARI_TARGET = 0.9
# Budgets for the embedded tiny model at batch 8 x 16 tokens (what the planner plans with):
STRONG_MEMORY = "12MB"  # trains the whole model, with room to serve one small owner
WEAK_MEMORIES = ("4MB", "3MB", "3500KB")  # two or one block(s): these owners need a helper
HELPER_MEMORY = "24MB"  # a pure helper: no data, serves owners' later layers
MAX_SEQ_LEN = 16  # synthetic sentences are at most 8 words
BANDWIDTHS = ("50Mbps", "20Mbps", "100Mbps", "10Mbps")
TRUTH_FILE = "truth.json"


@dataclass(frozen=True)
class ChurnConfig:
    """One churn run. Fractions are of all N nodes (kill) and of the killed ones (restart)."""

    nodes: int = 8  # N node processes (data nodes + pure helpers)
    tasks: int = 2  # T synthetic tasks, one per data node (round-robin)
    kill: float = 0.25  # share of the N nodes SIGKILLed mid-training
    restart: float = 0.0  # share of the killed nodes started again on the same --out
    rounds: int = 8  # merge rounds every data node trains
    local_steps: int = 16  # E: local steps per round
    batch_size: int = 8
    model: str = "tiny-gpt2"  # the embedded default (no download) or an installed HF model
    kind: str = "classification"  # synthetic records: classification (seq_cls) or lm (causal_lm)
    clusters: int = 0  # bootstrap --clusters K; 0 (default): the bootstrap chooses K by silhouette
    train_examples: int = 96  # per data node
    eval_examples: int = 64  # per data node (held out, same task)
    seed: int = 0
    heartbeat_s: float = 0.5
    suspect_after: float = 5.0
    dead_after: float = 20.0  # generous: a loaded 2-core machine stalls event loops for seconds
    step_timeout: float = 5.0  # an owner reports a silent helper after this (the usual repair path)
    timeout_s: float = 900.0  # the whole run, start to finish
    progress_s: float = 10.0  # seconds between progress lines

    def __post_init__(self) -> None:
        for name, low in (
            ("nodes", 2),
            ("tasks", 1),
            ("rounds", 1),
            ("local_steps", 1),
            ("batch_size", 1),
            ("train_examples", 1),
            ("eval_examples", 1),
            ("clusters", 0),
        ):
            require_int(f"ChurnConfig.{name}", getattr(self, name), low)
        max_tasks = SyntheticConfig().num_tasks
        if self.tasks > max_tasks:
            raise ValueError(
                f"ChurnConfig.tasks must be <= {max_tasks} (the synthetic generator's tasks), got {self.tasks}"
            )
        if self.tasks > data_node_count(self.nodes):
            raise ValueError(
                f"ChurnConfig.tasks={self.tasks} needs at least as many data nodes, "
                f"but nodes={self.nodes} gives {data_node_count(self.nodes)}"
            )
        for name in ("kill", "restart"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0 + 1e-12:
                raise ValueError(f"ChurnConfig.{name} must be a fraction in [0, 1], got {value!r}")
        if kill_count(self.nodes, self.kill) > self.nodes - self.tasks:
            raise ValueError(
                f"ChurnConfig.kill={self.kill} would kill too many of {self.nodes} nodes to keep one per task"
            )
        if self.kind not in ("classification", "lm"):
            raise ValueError(f"ChurnConfig.kind must be 'classification' or 'lm', got {self.kind!r}")
        for name in ("heartbeat_s", "suspect_after", "dead_after", "step_timeout", "timeout_s", "progress_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ChurnConfig.{name} must be > 0, got {value!r}")
        if not self.heartbeat_s < self.suspect_after < self.dead_after:
            raise ValueError(
                f"ChurnConfig: need heartbeat_s < suspect_after < dead_after, got "
                f"{self.heartbeat_s}, {self.suspect_after}, {self.dead_after}"
            )

    @property
    def bootstrap_clusters(self) -> int:
        """K handed to the bootstrap (0: it chooses by silhouette)."""
        return self.clusters

    @property
    def model_task(self) -> str:
        return "seq_cls" if self.kind == "classification" else "causal_lm"


def pure_helper_count(nodes: int) -> int:
    """Pure helpers among N nodes: N // 4 from N = 6 on (at least one), none below."""
    return max(1, nodes // 4) if nodes >= 6 else 0


def data_node_count(nodes: int) -> int:
    return nodes - pure_helper_count(nodes)


def kill_count(nodes: int, fraction: float) -> int:
    """round(N · fraction), at least 1 when the fraction is positive."""
    return max(1, round(nodes * fraction)) if fraction > 0 else 0


def restart_count(killed: int, fraction: float) -> int:
    return min(killed, math.ceil(killed * fraction - 1e-9)) if fraction > 0 else 0


@dataclass(frozen=True)
class NodeSpec:
    """One node process of the scenario."""

    name: str
    memory: str
    bandwidth: str
    task: int | None  # true task of its data; None for a pure helper
    data: Path | None = None
    eval: Path | None = None

    @property
    def has_data(self) -> bool:
        return self.task is not None


def plan_nodes(config: ChurnConfig, data_dir: Path) -> list[NodeSpec]:
    """Names, budgets and tasks of the N nodes (pure: no file is written).

    Data node j has task j mod T; the first data node of each task is strong (trains the
    whole model), the others are weak owners. Pure helpers come last."""
    specs = []
    for j in range(data_node_count(config.nodes)):
        task = j % config.tasks
        strong = j < config.tasks
        memory = STRONG_MEMORY if strong else WEAK_MEMORIES[(j // config.tasks - 1) % len(WEAK_MEMORIES)]
        name = f"t{task}-{'strong' if strong else 'weak'}{j // config.tasks}"
        specs.append(
            NodeSpec(
                name,
                memory,
                BANDWIDTHS[j % len(BANDWIDTHS)],
                task,
                data_dir / f"{name}.train.jsonl",
                data_dir / f"{name}.eval.jsonl",
            )
        )
    for h in range(pure_helper_count(config.nodes)):
        specs.append(NodeSpec(f"helper{h}", HELPER_MEMORY, BANDWIDTHS[(h + 2) % len(BANDWIDTHS)], None))
    return specs


def write_data(specs: Sequence[NodeSpec], config: ChurnConfig) -> None:
    """Training and held-out JSONL for every data node (different seeds per node and split)."""
    for index, spec in enumerate(specs):
        if spec.has_data:
            base = 1000 * (config.seed + 1) + 10 * index
            write_synthetic_jsonl(spec.data, spec.task, config.train_examples, config.kind, seed=base)
            write_synthetic_jsonl(spec.eval, spec.task, config.eval_examples, config.kind, seed=base + 1)


# --------------------------------------------------------------------------- acceptance


def acceptance_failures(result: Mapping[str, Any]) -> list[str]:
    """The churn acceptance checks that `result` fails, one sentence each."""
    failures = []
    if len(result["killed"]) < result.get("kill_requested", 0):
        failures.append(
            f"only {len(result['killed'])} of {result['kill_requested']} nodes could be killed "
            f"mid-training (training ended first?)"
        )
    missing = sorted(set(result["survivors"]) - set(result["finished"]))
    if missing:
        failures.append(f"survivors that did not finish every round: {', '.join(missing)}")
    unfinished_restarts = sorted(set(result["restarted"]) & set(result["data_nodes"]) - set(result["finished"]))
    if unfinished_restarts:
        failures.append(f"restarted nodes that did not finish: {', '.join(unfinished_restarts)}")
    crashed = {
        name: code
        for name, code in result["exit_codes"].items()
        if name not in result["killed_for_good"] and code not in (0, None)
    }
    if crashed:
        failures.append(f"nodes that exited with an error: {crashed}")
    if result["lost_updates"] != 0:
        failures.append(f"lost_updates = {result['lost_updates']} (must be 0)")
    killed_ids = {int(kill["id"]) for kill in result["kills"]}
    for kill in result["kills"]:
        alive = [o for o in kill["served"] if int(o) not in killed_ids]  # owners killed with it need none
        if alive and not kill["repaired"]:
            failures.append(
                f"{kill['name']} was killed serving owners {alive} but the bootstrap recorded no repair "
                f"of them (repairs in all = {result['repairs']})"
            )
    if result["ari"] is None or result["ari"] < ARI_TARGET:
        failures.append(f"ari = {result['ari']} (must be >= {ARI_TARGET})")
    series = result["loss_by_round_by_cluster"]
    if not series:
        failures.append("no loss was reported by any cluster")
    for cluster, values in series.items():
        if cluster == report.NO_CLUSTER:
            continue
        if not report.loss_falls({int(r): v for r, v in values.items()}):
            failures.append(f"cluster {cluster}: loss did not fall over the rounds ({values})")
    return failures


# --------------------------------------------------------------------------- the run


def bootstrap_repairs(state: Path) -> dict[str, Any]:
    """The coordinator's repair figures the bootstrap persisted in its state dir `state`, if any."""
    for name in ("coordinator.json", "metrics.json", "assignment.json"):
        path = state / name
        with contextlib.suppress(OSError, json.JSONDecodeError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "repairs" in data:
                return data
    return {}


def midway_victims(
    rows: Sequence[Mapping[str, Any]],
    names_by_id: Mapping[int, str],
    pure: set[str],
    count: int,
    rounds: Callable[[int], int],
    total_rounds: int,
) -> list[Victim] | None:
    """`count` victims in the middle of their training, from `rows` (a peer table read now,
    restricted to the nodes still running), or None while there are none yet: no plan in the
    table, too few eligible nodes, or a chosen helper whose owners have not finished a round
    (wait for them rather than pick another). Eligible: a helper whose owners have rounds
    left, a data node between its first and second-to-last round (`rounds(id)`: rounds done)."""
    if not plan_exists(rows):
        return None
    eligible = {h for h, owners in serving_helpers(rows).items() if any(rounds(o) <= total_rounds - 2 for o in owners)}
    eligible |= {int(r["id"]) for r in rows if 1 <= rounds(int(r["id"])) <= total_rounds - 2}
    victims = choose_victims(rows, names_by_id, pure, count, eligible)
    if len(victims) < count:
        return None
    if any(v.serves and max(rounds(o) for o in v.serves) < 1 for v in victims):
        return None
    return victims


def training_done(victim: Victim, rounds: Callable[[int], int], total_rounds: int) -> str:
    """How far a victim's training was when it was killed: its owners' rounds for a helper."""
    if victim.serves:
        return f"its owners have done {', '.join(str(rounds(o)) for o in victim.serves)} of {total_rounds} rounds"
    return f"{rounds(victim.node_id)} of {total_rounds} rounds done"


def write_truth(workdir: Path, specs: Sequence[NodeSpec], ids: Mapping[str, int]) -> None:
    """TRUTH_FILE in `workdir`: each node's id, true task, budget and whether it has data."""
    by_name = {s.name: s for s in specs}
    truth = {
        "nodes": {
            name: {
                "node_id": ids[name],
                "task": by_name[name].task,
                "memory": by_name[name].memory,
                "has_data": by_name[name].has_data,
            }
            for name in ids
        }
    }
    (workdir / TRUTH_FILE).write_text(json.dumps(truth, indent=2))


def repair_visible(rows: Sequence[Mapping[str, Any]], victim_ids: Sequence[int]) -> bool:
    """Whether peer table `rows` shows the victims gone (none alive) and no live owner still
    paired with one of them."""
    gone = set(victim_ids)
    by_id = {int(r["id"]): r for r in rows}
    if any(by_id.get(v, {}).get("status") == "alive" for v in gone):
        return False
    return not any(r.get("status") == "alive" and r.get("helper") in gone for r in rows)


def wait_until_quiet(predicate, timeout: float):
    """`swarm.wait_until` without the children's logs in the error (the caller only warns)."""
    return wait_until(predicate, timeout, interval=0.5, what="the repair to show in the peer table")


@dataclass
class RunProgress:
    """What a run saw while it ran (peer table snapshots, kill and restart times)."""

    table_before_kill: list[dict[str, Any]] = field(default_factory=list)
    table_last: list[dict[str, Any]] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    kill_at_s: float | None = None
    repaired_at_s: float | None = None
    victims: list[Victim] = field(default_factory=list)  # as chosen, with the table's reasons
    table_read_before_kill_s: float | None = None  # age of the table the victims came from


def churn_figures(
    config: ChurnConfig,
    specs: Sequence[NodeSpec],
    out_dirs: Mapping[str, Path],
    ids: Mapping[str, int],
    progress: RunProgress,
    bootstrap_state: Path,
    codes: Mapping[str, int | None],
    workdir: Path,
    wall_s: float,
) -> dict[str, Any]:
    """The figures of a churn run, read from what it left: every node's out dir (`out_dirs`,
    by name), the bootstrap's state dir, what the run saw (`progress`: victims, tables read),
    the node ids and exit codes by name (None: killed for good). Shared by the run with one
    process per node and the in-process one, so both count alike; `acceptance_failures`
    checks the result."""
    data_names = [s.name for s in specs if s.has_data]
    spec_of = {s.name: s for s in specs}
    runs = report.read_runs([out_dirs[s.name] for s in specs])
    by_name = {r.name: r for r in runs}
    killed_for_good = sorted(set(progress.killed) - set(progress.restarted))
    survivors = [n for n in data_names if n not in progress.killed]
    expected = set(survivors) | set(progress.restarted)
    finished = sorted(
        n
        for n in data_names
        if n in expected and n in by_name and by_name[n].finished and by_name[n].rounds_done >= config.rounds
    )
    # clusters: each node's own files first, else the last peer table it appeared in
    table = {int(r["id"]): r for r in progress.table_before_kill + progress.table_last}
    clusters = {}
    for name in data_names:
        cluster = by_name[name].cluster if name in by_name else None
        if cluster is None and ids.get(name) in table:
            cluster = table[ids[name]].get("cluster")
        clusters[name] = cluster
    truth = {n: spec_of[n].task for n in data_names}
    boot = bootstrap_repairs(bootstrap_state)
    node_repairs = sum(max((r.repairs_seen for r in run.rows), default=0) for run in runs if run.trains)
    owner_reports = {
        run.node_id: [r.helper for r in run.records.repairs]
        for run in runs
        if run.node_id is not None and run.records is not None
    }
    outcomes = kill_outcomes(progress.victims, boot.get("events", []), owner_reports)
    summary = report.summarize(runs)
    return {
        "nodes": config.nodes,
        "data_nodes": data_names,
        "pure_helpers": [s.name for s in specs if not s.has_data],
        "kill_requested": kill_count(config.nodes, config.kill),
        "killed": progress.killed,
        "killed_serving_helpers": [v.name for v in progress.victims if v.serves],
        "kills": outcomes,
        "node_ids": ids,
        "table_read_before_kill_s": progress.table_read_before_kill_s,
        "killed_for_good": killed_for_good,
        "restarted": progress.restarted,
        "survivors": survivors,
        "finished": finished,
        "repairs": int(boot.get("repairs", node_repairs)),
        "fallbacks": int(boot.get("fallbacks", 0)),
        "repair_source": "bootstrap" if boot else "nodes' metrics",
        "repair_events": boot.get("events", []),
        "lost_updates": summary["lost_updates"],
        "lost": summary["lost"],
        "contributions": summary["contributions"],
        "ari": report.adjusted_rand(truth, clusters),
        "clusters": clusters,
        "tasks": truth,
        "final_loss_by_cluster": summary["final_loss_by_cluster"],
        "loss_by_round_by_cluster": summary["loss_by_round_by_cluster"],
        "eval_by_round_by_cluster": summary["eval_by_round_by_cluster"],
        "eval_metric": summary["eval_metric"],
        "bytes_by_kind": summary["bytes_by_kind"],
        "exit_codes": codes,
        "kill_at_s": progress.kill_at_s,
        "repair_seen_after_s": (
            None if progress.repaired_at_s is None else round(progress.repaired_at_s - (progress.kill_at_s or 0.0), 2)
        ),
        "adapters": {r.name: r.summary.adapter_dir for r in runs if r.summary is not None},
        "peer_table_before_kill": progress.table_before_kill,
        "peer_table_last": progress.table_last,
        "clusters_given": config.bootstrap_clusters or None,
        "config": {k: v for k, v in asdict(config).items()},
        "workdir": str(workdir),
        "wall_s": round(wall_s, 2),
    }


class ChurnRun:
    """Runs one scenario in `workdir` (see the module doc); `run()` returns the figures.

    `show_tables`: print the peer table before the kill and once the repair shows in it."""

    def __init__(self, config: ChurnConfig, workdir: Path, say=print, show_tables: bool = False) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.say = say
        self.show_tables = show_tables
        self.specs = plan_nodes(config, self.workdir / "data")
        self.by_name = {s.name: s for s in self.specs}
        self.progress = RunProgress()
        self.started = time.monotonic()
        self.deadline = self.started + config.timeout_s

    # -- helpers -----------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SwarmError(f"global timeout of {self.config.timeout_s:g} s reached")
        return left

    def rounds_done(self, swarm: Swarm, name: str) -> int:
        try:
            return report.read_node_dir(swarm.out_dir(name)).rounds_done
        except report.ReportError:
            return 0

    def data_names(self) -> list[str]:
        return [s.name for s in self.specs if s.has_data]

    def node_args(self) -> list[str]:
        c = self.config
        return [
            "--model",
            c.model,
            "--rounds",
            str(c.rounds),
            "--local-steps",
            str(c.local_steps),
            "--batch-size",
            str(c.batch_size),
            "--max-seq-len",
            str(MAX_SEQ_LEN),
            "--seed",
            str(c.seed),
            "--step-timeout",
            str(c.step_timeout),
            "--emulate-link",
        ]  # each node's sends at its --bandwidth

    def start_node(self, swarm: Swarm, spec: NodeSpec) -> None:
        extra = self.node_args() + (["--eval", str(spec.eval)] if spec.eval else [])
        swarm.add_node(spec.name, memory=spec.memory, bandwidth=spec.bandwidth, data=spec.data, extra=extra, out=True)

    def peers_or_last(self, swarm: Swarm) -> list[dict[str, Any]]:
        with contextlib.suppress(Exception):
            self.progress.table_last = swarm.peers()
        return self.progress.table_last

    def progress_line(self, swarm: Swarm, waiting_for: Sequence[str]) -> str:
        parts = []
        for name in self.data_names():
            child = swarm.nodes.get(name)
            mark = "" if child is None or child.running else ("+" if child.proc.returncode == 0 else "x")
            parts.append(f"{name} {self.rounds_done(swarm, name)}/{self.config.rounds}{mark}")
        return f"[{self.elapsed():6.1f} s] rounds: {', '.join(parts)} (waiting for {len(waiting_for)})"

    def wait_with_progress(self, swarm: Swarm, done, what: str, waiting_for) -> None:
        """Poll `done()` until true, printing a progress line every progress_s seconds."""
        next_line = time.monotonic() + self.config.progress_s
        while not done():
            if time.monotonic() >= next_line:
                self.say(self.progress_line(swarm, waiting_for()))
                next_line = time.monotonic() + self.config.progress_s
            try:
                self.remaining()
            except SwarmError as exc:
                raise SwarmError(f"{exc} while waiting for {what}\n{swarm.describe()}") from None
            crashed = [
                n
                for n in waiting_for()
                if n in swarm.nodes and not swarm.nodes[n].running and swarm.nodes[n].proc.returncode != 0
            ]
            if crashed:
                logs = "\n".join(f"--- {n} ---\n{swarm.nodes[n].log_tail(15)}" for n in crashed)
                raise SwarmError(f"{', '.join(crashed)} exited with an error while waiting for {what}\n{logs}")
            time.sleep(0.2)

    # -- phases ------------------------------------------------------------------------

    def start(self, swarm: Swarm) -> dict[str, int]:
        c = self.config
        write_data(self.specs, c)
        extra = [
            "--model",
            c.model,
            "--task",
            c.model_task,
            "--min-nodes",
            str(len(self.data_names())),
            "--assign-after",
            "120",
            "--batch-size",
            str(c.batch_size),
            "--max-seq-len",
            str(MAX_SEQ_LEN),
        ]
        if c.model_task == "seq_cls":
            extra += ["--num-labels", str(SyntheticConfig().num_labels)]
        if c.bootstrap_clusters:
            extra += ["--clusters", str(c.bootstrap_clusters)]
        address = swarm.start_bootstrap(extra=extra)
        k_note = f"K = {c.bootstrap_clusters} given" if c.bootstrap_clusters else "K by silhouette"
        self.say(
            f"bootstrap on {address} ({k_note}; nodes are placed by their fingerprints); starting {len(self.specs)} nodes "
            f"({len(self.data_names())} with data over {c.tasks} tasks, "
            f"{len(self.specs) - len(self.data_names())} pure helpers)"
        )
        for spec in self.specs:
            self.start_node(swarm, spec)
            self.say(
                f"  {spec.name:<14} --memory {spec.memory:<7} --bandwidth {spec.bandwidth:<8} "
                + (f"task {spec.task} ({spec.data.name})" if spec.has_data else "no data (helper)")
            )
        ids = {spec.name: swarm.node_id(spec.name, timeout=self.remaining()) for spec in self.specs}
        write_truth(self.workdir, self.specs, ids)
        return ids

    def kill_midway(self, swarm: Swarm, ids: dict[str, int]) -> None:
        c = self.config
        count = kill_count(c.nodes, c.kill)
        if count == 0:
            return
        self.say(
            f"training; SIGKILL {count} node(s) in the middle of their training, chosen from a peer table "
            f"read at kill time once the plan is in it (a helper serving owners first)"
        )
        names_by_id = {i: n for n, i in ids.items()}
        pure = {s.name for s in self.specs if not s.has_data}
        picked: dict[str, Any] = {}

        def rounds(node_id: int) -> int:
            name = names_by_id.get(node_id)
            return 0 if name is None or name in pure else self.rounds_done(swarm, name)

        def ready() -> bool:
            if all(self.rounds_done(swarm, n) >= c.rounds for n in self.data_names()):
                raise SwarmError("every data node finished before a kill could happen mid-training")
            rows = swarm.peers()
            read_at = time.monotonic()
            running = {ids[n] for n, child in swarm.nodes.items() if child.running}
            rows = [r for r in rows if int(r["id"]) in running]
            victims = midway_victims(rows, names_by_id, pure, count, rounds, c.rounds)
            if victims is None:
                return False
            picked.update(rows=rows, victims=victims, read_at=read_at)
            return True

        try:
            self.wait_with_progress(swarm, ready, "training to reach the middle", lambda: self.data_names())
        except SwarmError as exc:
            if "before a kill" not in str(exc):
                raise
            self.say(f"[{self.elapsed():6.1f} s] no kill: {exc}")
            return
        rows, victims = picked["rows"], picked["victims"]
        for victim in victims:
            swarm.kill(victim.name, signal.SIGKILL)
        self.progress.kill_at_s = self.elapsed()
        self.progress.table_read_before_kill_s = round(time.monotonic() - picked["read_at"], 2)
        self.progress.table_before_kill = rows
        self.progress.victims = victims
        self.progress.killed = [v.name for v in victims]
        if self.show_tables:
            self.say(
                f"\n$ atlas-node peers --bootstrap {swarm.address}   # the table the victims were chosen from\n"
                f"{format_peer_table(rows)}\n"
            )
        for victim in victims:
            self.say(
                f"[{self.progress.kill_at_s:6.1f} s] SIGKILL {victim.name} (id {victim.node_id}): {victim.why}; "
                f"{training_done(victim, rounds, c.rounds)} "
                f"(table read {self.progress.table_read_before_kill_s:.1f} s before the kill)"
            )
        self.wait_for_repair(swarm, [v.node_id for v in victims])

    def wait_for_repair(self, swarm: Swarm, victim_ids: list[int]) -> None:
        """Wait until the peer table shows the victims gone and no live owner paired with one."""

        def repaired() -> list[dict[str, Any]] | None:
            rows = swarm.peers()
            return rows if repair_visible(rows, victim_ids) else None

        try:
            rows = wait_until_quiet(repaired, timeout=min(90.0, self.remaining()))
        except (SwarmError, WaitTimeout) as exc:
            self.say(f"[{self.elapsed():6.1f} s] no repair visible in the peer table: {exc}")
            return
        self.progress.repaired_at_s = self.elapsed()
        self.progress.table_last = rows
        latency = self.progress.repaired_at_s - (self.progress.kill_at_s or 0.0)
        self.say(f"[{self.elapsed():6.1f} s] peer table repaired {latency:.1f} s after the kill")
        if self.show_tables:
            self.say(format_peer_table(rows))

    def restart_some(self, swarm: Swarm, ids: dict[str, int]) -> None:
        count = restart_count(len(self.progress.killed), self.config.restart)
        if count == 0:
            return
        names = self.progress.killed[:count]
        swarm.wait_until(
            lambda: all(swarm.statuses().get(ids[n]) == "dead" for n in names),
            timeout=min(60.0, self.remaining()),
            what="the bootstrap to see the killed nodes dead",
        )
        for name in names:
            self.start_node(swarm, self.by_name[name])
            self.say(f"[{self.elapsed():6.1f} s] restarted {name} on the same --out (resumes from its checkpoint)")
        self.progress.restarted = names

    def finish(self, swarm: Swarm) -> dict[str, int | None]:
        killed_for_good = set(self.progress.killed) - set(self.progress.restarted)
        data_alive = [n for n in self.data_names() if n not in killed_for_good]

        def pending() -> list[str]:
            return [n for n in data_alive if swarm.nodes[n].running]

        self.wait_with_progress(swarm, lambda: not pending(), "the surviving data nodes to finish", pending)
        self.say(self.progress_line(swarm, []))
        self.peers_or_last(swarm)
        helpers = [s.name for s in self.specs if not s.has_data and s.name not in killed_for_good]
        with contextlib.suppress(SwarmError):  # helpers leave when the swarm is done; else SIGTERM
            swarm.wait_until(
                lambda: not any(swarm.nodes[n].running for n in helpers),
                timeout=min(20.0, self.remaining()),
                what="helpers to leave",
            )
        codes = {}
        for name, child in swarm.nodes.items():
            if child.running and name not in killed_for_good:
                codes[name] = swarm.kill(name, signal.SIGTERM)
            else:
                codes[name] = child.proc.returncode
        return {n: (None if n in killed_for_good else c) for n, c in codes.items()}

    def figures(self, swarm: Swarm, ids: dict[str, int], codes: dict[str, int | None]) -> dict[str, Any]:
        out_dirs = {s.name: swarm.out_dir(s.name) for s in self.specs}
        return churn_figures(
            self.config,
            self.specs,
            out_dirs,
            ids,
            self.progress,
            swarm.workdir / "bootstrap",
            codes,
            self.workdir,
            self.elapsed(),
        )

    def run(self) -> dict[str, Any]:
        c = self.config
        with Swarm(
            self.workdir, heartbeat_s=c.heartbeat_s, suspect_after=c.suspect_after, dead_after=c.dead_after
        ) as swarm:
            ids = self.start(swarm)
            self.kill_midway(swarm, ids)
            self.restart_some(swarm, ids)
            codes = self.finish(swarm)
            result = self.figures(swarm, ids, codes)
        result["wall_s"] = round(self.elapsed(), 2)
        return result


def kill_lines(result: Mapping[str, Any]) -> list[str]:
    """What happened to each victim, one sentence each, from the run's records."""
    names_by_id = {int(i): n for n, i in result["node_ids"].items()}
    return [describe_outcome(kill, names_by_id) for kill in result["kills"]]


def closing_claims(result: Mapping[str, Any]) -> list[str]:
    """The run's closing summary, each claim read from the figures (for a run that passed)."""
    names_by_id = {int(i): n for n, i in result["node_ids"].items()}
    expected = len(set(result["survivors"]) | (set(result["restarted"]) & set(result["data_nodes"])))
    claims = [f"{len(result['finished'])}/{expected} surviving data nodes finished every round"]
    claims.append(f"{result['lost_updates']} of {result['contributions']} contributions lost")
    claims += [short_claim(kill, names_by_id) for kill in result["kills"]] or ["nobody was killed"]
    claims.append(f"clusters match the tasks (ARI {result['ari']})")
    claims.append("loss fell in every cluster")
    return claims


def print_result(result: Mapping[str, Any], failures: Sequence[str], say=print) -> None:
    say("")
    say(f"killed {result['killed']}, restarted {result['restarted']}")
    for line in kill_lines(result):
        say(f"  {line}")
    expected = len(set(result["survivors"]) | (set(result["restarted"]) & set(result["data_nodes"])))
    say(
        f"finished {len(result['finished'])}/{expected} (survivors and restarted data nodes); repairs {result['repairs']}, "
        f"fallbacks {result['fallbacks']} ({result['repair_source']}); lost updates {result['lost_updates']} "
        f"of {result['contributions']} contributions; ARI {result['ari']}"
    )
    say(
        report.format_round_table(
            "loss by round (mean over each cluster's nodes)",
            {c: {int(r): v for r, v in s.items()} for c, s in result["loss_by_round_by_cluster"].items()},
        )
    )
    say("bytes sent by kind: " + ", ".join(f"{k} {v:,}" for k, v in result["bytes_by_kind"].items()))
    say(f"wall time {result['wall_s']:.1f} s")
    if failures:
        say("ACCEPTANCE FAILED:")
        for line in failures:
            say(f"  - {line}")
    else:
        say("acceptance: every check passed: " + "; ".join(closing_claims(result)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=ChurnConfig.nodes)
    parser.add_argument("--tasks", type=int, default=ChurnConfig.tasks)
    parser.add_argument("--kill", type=float, default=ChurnConfig.kill, help="fraction of the nodes to SIGKILL")
    parser.add_argument("--restart", type=float, default=ChurnConfig.restart, help="fraction of the killed to restart")
    parser.add_argument("--rounds", type=int, default=ChurnConfig.rounds)
    parser.add_argument("--local-steps", type=int, default=ChurnConfig.local_steps)
    parser.add_argument("--batch-size", type=int, default=ChurnConfig.batch_size)
    parser.add_argument("--model", default=ChurnConfig.model)
    parser.add_argument("--kind", choices=("classification", "lm"), default=ChurnConfig.kind)
    parser.add_argument(
        "--clusters",
        type=int,
        default=ChurnConfig.clusters,
        help="K for the bootstrap (default 0: the bootstrap chooses K by silhouette). "
        "Only K is given: which node goes where comes from the fingerprints",
    )
    parser.add_argument("--seed", type=int, default=ChurnConfig.seed)
    parser.add_argument("--timeout", type=float, default=ChurnConfig.timeout_s, help="seconds for the whole run")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep data, logs and outputs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    try:
        config = ChurnConfig(
            nodes=args.nodes,
            tasks=args.tasks,
            kill=args.kill,
            restart=args.restart,
            rounds=args.rounds,
            local_steps=args.local_steps,
            batch_size=args.batch_size,
            model=args.model,
            kind=args.kind,
            clusters=args.clusters,
            seed=args.seed,
            timeout_s=args.timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(SystemExit(128 + signum)))
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atlas-churn-")))
        print(f"churn scenario in {workdir} (logs in {workdir / 'logs'})")
        try:
            result = ChurnRun(config, workdir).run()
        except SwarmError as exc:
            print(f"churn scenario failed: {exc}", file=sys.stderr)
            return 1
        failures = acceptance_failures(result)
        result["acceptance_failures"] = failures
        print_result(result, failures)
        if args.json_path:
            args.json_path.write_text(json.dumps(result, indent=2, default=str))
            print(f"figures written to {args.json_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
