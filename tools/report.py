"""Summarise a swarm run from the nodes' `--out` directories: tables, lost updates, ARI, plots.

Every node writes under its `--out` (docs/RUNTIME.md, Results), through the records of
atlas_p2p/records.py, and this module reads them back through the same classes:
- `metrics.jsonl`: one `RoundLine` per round it finished;
- `summary.json`: its `Summary` when it ended;
- `checkpoint/state.json`: its `CheckpointState` after its last round (what a node
  killed for good leaves instead of a summary).

This module only reads those files; it never talks to a node. A node killed with
SIGKILL may leave a torn last line, and a node restarted on the same `--out` appends
after it and may write a round twice (it replays the round it was in): torn lines are
skipped and counted, and for each round the last line wins.

Lost updates (DESIGN 8, "nothing is lost"): atlas_p2p.records.lost_updates over the
nodes' summaries, or checkpoint states of nodes that left none.

ARI: the scenario knows each data node's true task; the clusters come from the files
(`summary.json`, else the last metrics line) or from the peer table the scenario saw.
The adjusted Rand index compares the two partitions up to renaming of cluster ids.

    python -m tools.report RUN/nodes/* [--truth RUN/truth.json] [--plots DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_p2p.records import KINDS, CheckpointState, RoundLine, Summary
from atlas_p2p.records import lost_updates as lost_records
from atlas_p2p.validation import is_number

log = logging.getLogger("atlas.report")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_STATE = Path("checkpoint") / "state.json"  # a killed node's last round state
NO_CLUSTER = "none"  # key for rows without a cluster (pure helpers)


class ReportError(ValueError):
    """An out directory or file that cannot be read as a node's results."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class NodeRun:
    """What one node left on disk."""

    name: str  # the directory name unless given
    out_dir: Path
    rows: tuple[RoundLine, ...]  # metrics lines, one per round (the last written wins), by round
    summary: Summary | None  # summary.json, None when absent (killed, still running)
    bad_lines: int = 0  # torn or non-object lines skipped
    bytes_sent: tuple[tuple[str, int], ...] = ()  # (kind, bytes) over all incarnations, see sent_totals
    checkpoint: CheckpointState | None = None  # checkpoint/state.json (read when there is no summary)

    @property
    def records(self) -> Summary | CheckpointState | None:
        """The full lists (contributions, patches folded): the summary, else the checkpoint state."""
        return self.summary if self.summary is not None else self.checkpoint

    @property
    def node_id(self) -> int | None:
        if self.records is not None and self.records.node_id is not None:
            return self.records.node_id
        return self.rows[-1].node_id if self.rows else None

    @property
    def cluster(self) -> int | None:
        """The cluster the node ended in: summary.json first, else its last metrics line."""
        if self.summary is not None and self.summary.cluster is not None:
            return self.summary.cluster
        for row in reversed(self.rows):
            if row.cluster is not None:
                return row.cluster
        return None

    @property
    def role(self) -> str | None:
        return self.rows[-1].role if self.rows else None

    @property
    def rounds_done(self) -> int:
        return self.summary.rounds_done if self.summary is not None else len(self.rows)

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.finished

    @property
    def trains(self) -> bool:
        """True when any round line has a loss (a data node, not a pure helper)."""
        return any(_number(row.loss) is not None for row in self.rows)


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools, strings, NaN and None are not numbers)."""
    return float(value) if is_number(value) else None


def read_metrics(path: Path) -> tuple[list[RoundLine], int]:
    """Parse a metrics JSONL file: (lines in file order, number of torn lines skipped).

    A line that is not JSON is torn (a kill mid-write) and skipped; an object that is not
    a `RoundLine` is a ReportError (the file is not what a node writes)."""
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            log.warning("%s line %d: not a JSON object (torn by a kill?), skipped", path, number)
            bad += 1
            continue
        rows.append(_record(RoundLine, row, f"{path} line {number}"))
    return rows, bad


def _record(cls, data: Any, where: str):
    """`cls.from_json(data)`, or a ReportError naming where the data came from."""
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        return cls.from_json(data)
    except KeyError as exc:
        raise ReportError(f"{where}: not a {cls.__name__}: missing {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ReportError(f"{where}: not a {cls.__name__}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from None


def _by_round(rows: Iterable[RoundLine]) -> tuple[RoundLine, ...]:
    """One row per round, the last written winning."""
    return tuple(row for _, row in sorted({row.round: row for row in rows}.items()))


def read_node_dir(path: Path | str, name: str | None = None) -> NodeRun:
    """Read one node's `--out` directory (a missing metrics file means no round finished)."""
    out = Path(path)
    if not out.is_dir():
        raise ReportError(f"{out}: not a directory")
    metrics = out / METRICS_FILE
    rows, bad = read_metrics(metrics) if metrics.exists() else ([], 0)
    summary_path, state_path = out / SUMMARY_FILE, out / CHECKPOINT_STATE
    summary = _record(Summary, _read_json(summary_path), str(summary_path)) if summary_path.exists() else None
    checkpoint = None
    if summary is None and state_path.exists():  # written atomically: readable unless damaged
        checkpoint = _record(CheckpointState, _read_json(state_path), str(state_path))
    return NodeRun(
        name=name or out.name,
        out_dir=out,
        rows=_by_round(rows),
        summary=summary,
        bad_lines=bad,
        bytes_sent=tuple(sent_totals(rows).items()),
        checkpoint=checkpoint,
    )


def sent_totals(rows: Sequence[RoundLine]) -> dict[str, int]:
    """Bytes sent by kind over a node's whole life, from its lines in file order.

    Each line carries running totals since the process started; a restarted process
    counts from zero again, so a total that drops starts a new segment:
    total = Σ over segments of the segment's last value."""
    closed: dict[str, int] = {}
    current: dict[str, int] = {}
    for row in rows:
        values = row.bytes_by_kind
        if any(values.get(k, 0) < v for k, v in current.items()):  # a new incarnation
            for k, v in current.items():
                closed[k] = closed.get(k, 0) + v
        current = values
    for k, v in current.items():
        closed[k] = closed.get(k, 0) + v
    return closed


def read_runs(paths: Iterable[Path | str]) -> list[NodeRun]:
    """`read_node_dir` for each path; directories with neither file are skipped (logged)."""
    runs = []
    for path in paths:
        run = read_node_dir(path)
        if not run.rows and run.summary is None:
            log.info("%s: no %s or %s yet, skipped", path, METRICS_FILE, SUMMARY_FILE)
            continue
        runs.append(run)
    return runs


# --------------------------------------------------------------------------- per-round values


def eval_value(row: RoundLine) -> tuple[str, float] | None:
    """(metric name, value) of a row's held-out evaluation, None without one (or not finite)."""
    if row.eval is None or _number(row.eval.value) is None:
        return None
    return row.eval.metric, row.eval.value


def cluster_key(cluster: Any) -> str:
    """JSON-ready cluster key: "0", "1", ... or "none"."""
    return NO_CLUSTER if cluster is None else str(cluster)


def _mean_by_round(runs: Sequence[NodeRun], pick) -> dict[str, dict[int, float]]:
    """cluster -> round -> mean over the cluster's nodes of pick(row) (None values skipped)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for row in run.rows:
            value = pick(row)
            if value is None:
                continue
            sums.setdefault(cluster_key(row.cluster), {}).setdefault(row.round, []).append(value)
    return {c: {r: sum(v) / len(v) for r, v in sorted(by_r.items())} for c, by_r in sorted(sums.items())}


def loss_by_round_by_cluster(runs: Sequence[NodeRun]) -> dict[str, dict[int, float]]:
    """Mean training loss of each cluster's nodes at each round."""
    return _mean_by_round(runs, lambda row: _number(row.loss))


def eval_by_round_by_cluster(runs: Sequence[NodeRun]) -> dict[str, dict[int, float]]:
    """Mean held-out metric of each cluster's nodes at each round (see `eval_names`)."""
    return _mean_by_round(runs, lambda row: (eval_value(row) or (None, None))[1])


def eval_names(runs: Sequence[NodeRun]) -> list[str]:
    """Distinct eval metric names seen (e.g. ["accuracy"])."""
    names = {found[0] for run in runs for row in run.rows if (found := eval_value(row))}
    return sorted(names)


def final_loss_by_cluster(runs: Sequence[NodeRun]) -> dict[str, float]:
    """Per cluster, its mean loss at the last round any member reported (a node killed
    early does not drag its old loss into the final figure)."""
    return {c: series[max(series)] for c, series in loss_by_round_by_cluster(runs).items() if series}


def loss_falls(series: Mapping[int, float]) -> bool:
    """True when a cluster's loss at its last round is below its loss at its first round."""
    if len(series) < 2:
        return False
    rounds = sorted(series)
    return series[rounds[-1]] < series[rounds[0]]


def bytes_by_kind(runs: Sequence[NodeRun]) -> dict[str, int]:
    """Bytes sent by all nodes, by kind (each node's `sent_totals`)."""
    totals = dict.fromkeys(KINDS, 0)
    for run in runs:
        for kind, value in run.bytes_sent:
            totals[kind] = totals.get(kind, 0) + value
    return totals


# --------------------------------------------------------------------------- lost updates


def contributions_made(runs: Sequence[NodeRun]) -> int:
    """How many contributions the nodes made and sent (from their summaries or checkpoints)."""
    return sum(len(run.records.contributions) for run in runs if run.records is not None)


def lost_updates(runs: Sequence[NodeRun]) -> list[dict[str, Any]]:
    """Contributions made and never merged (atlas_p2p.records.lost_updates), named by node directory."""
    names = {run.node_id: run.name for run in runs}
    lost = lost_records(run.records for run in runs if run.records is not None)
    return [{"digest": x.digest, "node": names[x.node_id], "round": x.round} for x in lost]


# --------------------------------------------------------------------------- clustering quality


def adjusted_rand(truth: Mapping[str, Any], clusters: Mapping[str, Any]) -> float | None:
    """ARI between the true tasks and the clusters over the nodes present in `truth`.

    A node without a cluster counts as its own singleton (an unassigned node is an
    error of the clustering, not something to hide). None when fewer than 2 nodes."""
    from sklearn.metrics import adjusted_rand_score

    names = sorted(truth)
    if len(names) < 2:
        return None
    predicted = [f"c{clusters[n]}" if clusters.get(n) is not None else f"unassigned-{n}" for n in names]
    return float(adjusted_rand_score([str(truth[n]) for n in names], predicted))


def clusters_of(runs: Sequence[NodeRun]) -> dict[str, int | None]:
    """node name -> the cluster its files say it ended in."""
    return {run.name: run.cluster for run in runs}


# --------------------------------------------------------------------------- output


def format_round_table(title: str, series: Mapping[str, Mapping[int, float]], digits: int = 4) -> str:
    """Rows = rounds, columns = clusters; '-' where a cluster has no value."""
    clusters = list(series)
    if not clusters:
        return f"{title}: no values"
    rounds = sorted({r for values in series.values() for r in values})
    header = ["round"] + [f"cluster {c}" for c in clusters]
    cells = [header] + [
        [str(r)] + [f"{series[c][r]:.{digits}f}" if r in series[c] else "-" for c in clusters] for r in rounds
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in cells]
    return "\n".join([title, *lines])


def format_nodes(runs: Sequence[NodeRun]) -> str:
    """One line per node: id, cluster, role, rounds, finished, adapter dir."""
    lines = []
    for run in sorted(runs, key=lambda r: (r.node_id is None, r.node_id or 0, r.name)):
        adapter = (run.summary.adapter_dir if run.summary is not None else None) or "-"
        lines.append(
            f"  {run.name:<10} id={run.node_id if run.node_id is not None else '-':<3} "
            f"cluster={cluster_key(run.cluster):<5} role={run.role or '-':<7} rounds={run.rounds_done:<3} "
            f"finished={'yes' if run.finished else 'no':<4} adapter={adapter}"
        )
    return "\n".join(lines)


def write_plots(runs: Sequence[NodeRun], directory: Path | str) -> list[Path]:
    """PNG plots of loss (and eval) by round per cluster; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'atlas-p2p[plots]'): no plots")
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    names = eval_names(runs)
    for stem, series, ylabel in (
        ("loss_by_round", loss_by_round_by_cluster(runs), "training loss"),
        ("eval_by_round", eval_by_round_by_cluster(runs), names[0] if len(names) == 1 else "eval"),
    ):
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for cluster, values in series.items():
            rounds = sorted(values)
            ax.plot(rounds, [values[r] for r in rounds], marker="o", label=f"cluster {cluster}")
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summarize(runs: Sequence[NodeRun], truth: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-ready figures of a run (the same keys the churn scenario writes)."""
    loss = loss_by_round_by_cluster(runs)
    lost = lost_updates(runs)
    result: dict[str, Any] = {
        "nodes": len(runs),
        "finished": sorted(run.name for run in runs if run.finished),
        "contributions": contributions_made(runs),
        "lost_updates": len(lost),
        "lost": lost,
        "final_loss_by_cluster": final_loss_by_cluster(runs),
        "loss_by_round_by_cluster": {c: {str(r): v for r, v in s.items()} for c, s in loss.items()},
        "eval_by_round_by_cluster": {
            c: {str(r): v for r, v in s.items()} for c, s in eval_by_round_by_cluster(runs).items()
        },
        "eval_metric": eval_names(runs),
        "bytes_by_kind": bytes_by_kind(runs),
        "torn_lines": sum(run.bad_lines for run in runs),
    }
    if truth is not None:
        known = {name: task for name, task in truth.items() if any(run.name == name for run in runs)}
        result["ari"] = adjusted_rand(known, clusters_of(runs))
    return result


def render(runs: Sequence[NodeRun]) -> str:
    """The human report: nodes, loss and eval tables by cluster, bytes and lost updates."""
    names = eval_names(runs)
    parts = [
        "nodes:",
        format_nodes(runs),
        "",
        format_round_table("training loss by round (mean over the cluster's nodes)", loss_by_round_by_cluster(runs)),
        "",
        format_round_table(
            f"held-out {', '.join(names) or 'eval'} by round (mean over the cluster's nodes)",
            eval_by_round_by_cluster(runs),
        ),
        "",
        "bytes sent by kind: " + ", ".join(f"{k} {v:,}" for k, v in bytes_by_kind(runs).items()),
        f"contributions made {contributions_made(runs)}, lost updates {len(lost_updates(runs))}",
    ]
    return "\n".join(parts)


def load_truth(path: Path | str) -> dict[str, Any]:
    """{node name: task} from a truth file: {"nodes": {name: {"task": t, ...}}} or {name: t}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from None
    nodes = data.get("nodes", data) if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        raise ReportError(f"{path}: expected an object of nodes")
    truth = {}
    for name, value in nodes.items():
        task = value.get("task") if isinstance(value, dict) else value
        if task is not None:
            truth[str(name)] = task
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dirs", nargs="+", type=Path, help="nodes' --out directories")
    parser.add_argument("--truth", type=Path, help="truth.json written by a scenario (true task per node)")
    parser.add_argument("--plots", type=Path, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.out_dirs)
        truth = load_truth(args.truth) if args.truth else None
    except ReportError as exc:
        print(f"atlas-report: error: {exc}", file=sys.stderr)
        return 3
    if not runs:
        print("atlas-report: error: none of the directories holds metrics.jsonl or summary.json", file=sys.stderr)
        return 3
    print(render(runs))
    figures = summarize(runs, truth)
    if truth is not None:
        print(f"clustering vs true tasks: ARI {figures['ari']}")
    if args.plots:
        for path in write_plots(runs, args.plots):
            print(f"plot: {path}")
    if args.json_path:
        args.json_path.write_text(json.dumps(figures, indent=2))
        print(f"figures: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
