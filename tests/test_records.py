"""The results schema: what a node writes (its metrics log, summary writer and checkpoint
writer) reads back through tools/report.py unchanged, field for field; and the one
lost-update definition."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest

from atlas_p2p.records import (
    CheckpointState,
    ContributionRecord,
    Evaluation,
    FoldedRecord,
    LostUpdate,
    RepairRecord,
    RoundLine,
    Summary,
    lost_updates,
)
from atlas_p2p.versioning import VersionedBase
from nodes.checkpoint import load_checkpoint, save_checkpoint
from nodes.metrics import MetricsLog, write_summary
from tools import report
from tools.report import ReportError

MADE = (ContributionRecord(0, "c0", 12), ContributionRecord(1, "c1", 9, carry=True))
FOLDED = (
    FoldedRecord(0, 1, "p0", ("1", "2"), "manifest", ("c0", "d0")),
    FoldedRecord(1, 2, "p1", ("1",), "catch-up"),
)
REPAIRS = (RepairRecord(1700000000.5, 1, 7, "timeout"),)


def _line(rnd: int, **changes) -> RoundLine:
    line = RoundLine(
        node_id=1,
        cluster=0,
        round=rnd,
        role="owner",
        loss=1.25,
        eval=Evaluation("accuracy", 0.75, 0.5),
        steps=4,
        step_rate=2.5,
        bytes_by_kind={"activations": 10, "gradients": 9, "adapters": 8, "fingerprints": 7, "control": 6},
        base_version=rnd + 1,
        contributions=(f"c{rnd}",),
        manifests_folded=(f"p{rnd}",),
        carried_over=rnd == 1,
        repairs_seen=1,
        helper=7,
        time=1700000001.25,
    )
    return replace(line, **changes)


def _summary() -> Summary:
    return Summary(
        node_id=1,
        finished=True,
        rounds_done=2,
        rounds=2,
        cluster=0,
        role="owner",
        has_data=True,
        split=3,
        ranks={"blocks.0.attn": 4},
        helper=7,
        adapter_dir="/out/adapter",
        export={"path": "/out/adapter", "rank": 4, "error": "no eval"},
        export_error="no eval",
        base_version=2,
        contributions=MADE,
        manifests_folded=FOLDED,
        repairs=REPAIRS,
        split_mode="two-part",
        steps_served=5,
        requests_served={"forward": 5},
        labels_received=5,
        bytes_by_kind=_line(0).bytes_by_kind,
        peak_rss_mb={"fingerprint": 512.0, "train": None},
        base_digest="abc",
    )


def _state() -> CheckpointState:
    return CheckpointState(
        node_id=1,
        cluster=0,
        round=1,
        base_version=2,
        rounds_done=2,
        steps_total=8,
        contributions=MADE,
        manifests=FOLDED,
        repairs=REPAIRS,
    )


def _no_defaults(record) -> None:
    """Every field differs from its default, so a field the reader drops cannot pass unseen."""
    for f in fields(record):
        value = getattr(record, f.name)
        assert value is not None and value is not False and value not in ((), {}), f.name


def test_what_a_finished_node_writes_reads_back_through_the_report_field_for_field(tmp_path):
    lines, summary = [_line(0), _line(1)], _summary()
    for record in (lines[1], summary):
        _no_defaults(record)
    log = MetricsLog(tmp_path / report.METRICS_FILE)
    for line in lines:
        log.write(line)
    write_summary(tmp_path, summary)

    run = report.read_node_dir(tmp_path)

    assert run.rows == tuple(lines) and run.summary == summary and run.bad_lines == 0
    assert log.lines() == lines
    assert run.node_id == 1 and run.cluster == 0 and run.finished and run.rounds_done == 2


def test_what_a_killed_node_leaves_in_its_checkpoint_reads_back_through_the_report(tmp_path):
    state = _state()
    _no_defaults(state)
    MetricsLog(tmp_path / report.METRICS_FILE).write(_line(0))
    save_checkpoint(tmp_path, state, VersionedBase("0"), None)

    run = report.read_node_dir(tmp_path)

    assert run.summary is None and run.checkpoint == state and run.records == state
    assert load_checkpoint(tmp_path).state == state


def test_a_key_the_node_does_not_write_is_a_clear_error_not_an_alias(tmp_path):
    data = _line(0).to_json()
    del data["manifests_folded"]
    (tmp_path / report.METRICS_FILE).write_text(json.dumps(data) + "\n")

    with pytest.raises(ReportError, match="manifests_folded"):
        report.read_node_dir(tmp_path)


# ---- lost updates ------------------------------------------------------------------------
def _made(node_id: int, *rounds: int) -> CheckpointState:
    made = tuple(ContributionRecord(r, f"n{node_id}r{r}", 1) for r in rounds)
    return replace(_state(), node_id=node_id, contributions=made, manifests=(), repairs=())


def _folded(rnd: int, *nodes: int) -> FoldedRecord:
    return FoldedRecord(rnd, rnd + 1, f"p{rnd}", tuple(str(n) for n in nodes), "catch-up")


def test_an_update_is_lost_when_neither_it_nor_a_later_one_of_its_node_was_merged():
    anchor = replace(_made(1, 0, 1), manifests=(_folded(0, 1, 2), _folded(1, 2)))
    member = _made(2, 0, 1)  # both merged (round 0 directly, round 1 through the anchor's record)

    assert lost_updates([anchor, member]) == [LostUpdate(1, 1, "n1r1")]


def test_an_update_carried_into_a_merged_later_one_is_not_lost():
    node = replace(_made(1, 0, 1, 2), manifests=(_folded(2, 1),))  # rounds 0 and 1 rode inside round 2's

    assert lost_updates([node]) == []
    assert lost_updates([replace(node, contributions=node.contributions + (ContributionRecord(3, "late", 1),))]) == [
        LostUpdate(1, 3, "late")
    ]


def test_the_report_and_the_records_count_lost_updates_the_same_way(tmp_path):
    anchor = replace(_made(1, 0, 1), manifests=(_folded(0, 1, 2),))
    member = _made(2, 0, 1)
    for name, state in (("a", anchor), ("b", member)):
        save_checkpoint(tmp_path / name, state, VersionedBase("0"), None)

    lost = report.lost_updates([report.read_node_dir(tmp_path / name) for name in ("a", "b")])

    assert lost == [{"digest": "n1r1", "node": "a", "round": 1}, {"digest": "n2r1", "node": "b", "round": 1}]
    assert [x["digest"] for x in lost] == [x.digest for x in lost_updates([anchor, member])]
