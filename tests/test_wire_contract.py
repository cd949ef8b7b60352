"""The wire says what the runtime does: docs/CONTRACTS.md lists every message type and field
with the modules that build and read it, and this test holds the list to the registry and
to the code.

- The table and `transport.messages.MESSAGE_TYPES` name the same types, each with the same
  fields.
- A producer module names the message class and sets every field (`field=` or a "field"
  key); a consumer module names the class or its tag and reads every field (`.field` or a
  "field" key). A field only a default ever fills, or that nobody reads, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from transport.messages import MESSAGE_TYPES

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| message | fields | producers | consumers |"


def _rows() -> dict[str, tuple[list[str], list[str], list[str]]]:
    """tag -> (fields, producer paths, consumer paths), from the table in docs/CONTRACTS.md."""
    lines = (ROOT / "docs" / "CONTRACTS.md").read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2  # skip the header and its |---| line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4, f"CONTRACTS.md row needs 4 cells: {line}"
        tag = cells[0].strip("`")
        assert tag not in rows, f"CONTRACTS.md lists {tag!r} twice"
        fields = [f.strip().strip("`") for f in cells[1].split(",") if f.strip()]
        modules = [[m.strip() for m in cell.split(",") if m.strip()] for cell in cells[2:]]
        rows[tag] = (fields, *modules)
    return rows


ROWS = _rows()


def _source(path: str) -> str:
    file = ROOT / path
    assert file.is_file(), f"CONTRACTS.md names {path}, which does not exist"
    return file.read_text()


def _sets(field: str, text: str) -> bool:
    return re.search(rf"\b{field}\s*=(?!=)|[\"']{field}[\"']", text) is not None


def _reads(field: str, text: str) -> bool:
    return re.search(rf"\.{field}\b|[\"']{field}[\"']", text) is not None


def test_the_table_lists_exactly_the_registered_types_and_fields():
    assert set(ROWS) == set(MESSAGE_TYPES)
    for tag, (fields, _, _) in ROWS.items():
        assert fields == list(MESSAGE_TYPES[tag].SCHEMA), f"{tag}: CONTRACTS.md lists {fields}"


@pytest.mark.parametrize("tag", sorted(ROWS))
def test_every_type_is_built_by_its_producers_and_read_by_its_consumers(tag):
    fields, producers, consumers = ROWS[tag]
    name = MESSAGE_TYPES[tag].__name__
    assert producers and consumers, f"{tag}: needs at least one producer and one consumer"
    made = [_source(p) for p in producers]
    read = [_source(p) for p in consumers]
    handled = rf"\b{name}\b|[\"']{tag}[\"']|\b{tag}=|\brpc_{tag}\b"
    problems = [f"no producer names {name}"] * (not any(re.search(rf"\b{name}\b", t) for t in made))
    problems += [f"no consumer names {name} or {tag!r}"] * (not any(re.search(handled, t) for t in read))
    problems += [f"{field}: no producer sets it" for field in fields if not any(_sets(field, t) for t in made)]
    problems += [f"{field}: no consumer reads it" for field in fields if not any(_reads(field, t) for t in read)]
    assert not problems, f"{tag}: {problems}"


def test_a_dead_field_is_caught():
    """The checks are not vacuous: a field set only by its default and read nowhere fails them."""
    producer = "Heartbeat(node_id=1, state='waiting', round=0)"
    assert not _sets("steps", producer) and not _reads("steps", "body.state; body.round")
    assert _sets("round", producer) and _reads("round", "body.round")
