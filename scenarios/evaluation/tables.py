"""The results table (markdown) and plots (PNG) from `results.json`'s methods."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: Mapping[str, Any]) -> str:
    """One row per method: mean and per-task score, time to target, traffic, clustering, losses."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    metric = results.get("metric", "accuracy")
    tasks = list(results.get("tasks", []))
    head = [
        "method",
        f"mean {metric}",
        *tasks,
        "rounds to target",
        "s to target",
        "MB sent / node",
        "K",
        "ARI",
        "lost",
        "lr",
        "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        sent = sum(m["bytes_per_node_mb"].values()) if m.get("bytes_per_node_mb") else None
        cells = [
            name,
            _fmt(m.get(f"mean_{metric}")),
            *(_fmt(m.get("per_task", {}).get(t)) for t in tasks),
            _fmt(m.get("rounds_to_target")),
            _fmt(m.get("wall_to_target_s"), 0),
            _fmt(sent, 1),
            _fmt(m.get("k")),
            _fmt(m.get("ari"), 2),
            _fmt(m.get("lost_updates")),
            f"{m['lr']:g}" if isinstance(m.get("lr"), float) else "-",
            _fmt(m.get("wall_s"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    target = results.get("target")
    note = f"Target: 95% of `per-task`'s mean {metric} ({_fmt(target)})." if target is not None else ""
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def plots(results: Mapping[str, Any], directory: Path) -> list[Path]:
    """curve.png (score by round per method), bytes.png (MB sent per node by kind), time.png
    (wall seconds to the target); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    metric = results.get("metric", "accuracy")
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in methods.items():
        series = {int(r): v for r, v in m.get("curve", {}).items()}
        if series:
            ax.plot([r + 1 for r in series], list(series.values()), marker="o", label=name)
    if results.get("target") is not None:
        ax.axhline(results["target"], color="grey", linestyle=":", label="target")
    ax.set_xlabel("round")
    ax.set_ylabel(f"mean {metric} over tasks")
    ax.set_title(f"setting {results.get('setting', {}).get('name', '?')}: {metric} by round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    written.append(_save(fig, directory / "curve.png"))

    kinds = sorted({k for m in methods.values() for k in m.get("bytes_per_node_mb", {})})
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(methods)
    for kind in kinds:
        values = [m.get("bytes_per_node_mb", {}).get(kind, 0) for m in methods.values()]
        ax.bar(list(methods), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("MB sent per data node")
    ax.set_title("traffic by kind")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    written.append(_save(fig, directory / "bytes.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    seconds = [m.get("wall_to_target_s") or 0.0 for m in methods.values()]
    ax.bar(list(methods), seconds)
    for i, m in enumerate(methods.values()):
        if m.get("wall_to_target_s") is None:
            ax.text(i, 0, "not reached", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_ylabel("seconds to target")
    ax.set_title("wall time to 95% of per-task")
    ax.tick_params(axis="x", rotation=30)
    written.append(_save(fig, directory / "time.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
