"""Field checks for frozen config dataclasses and records: one message shape everywhere.

Each `require_*` returns the value when it fits and otherwise raises ValueError naming
the field and the bad value ("rounds must be an int >= 1, got 0"). A bool is never an
int or a number here (Python counts True as 1; a flag passed where a count is due is a
mistake), and a number must be finite unless a check passes `finite=False`. Where a
value may come out of numpy arithmetic (ids, counts, scalings), `numpy=True` lets a numpy
scalar count as an int or a number too.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np


def is_int(value: object, *, numpy: bool = False) -> bool:
    """An int that is not a bool; with `numpy`, a numpy integer scalar counts too."""
    return isinstance(value, (int, np.integer) if numpy else int) and not isinstance(value, bool)


def is_number(value: object, *, numpy: bool = False, finite: bool = True) -> bool:
    """An int or float that is not a bool, and finite unless `finite` is False; with `numpy`,
    numpy integer and floating scalars count too."""
    kinds = (int, float, np.integer, np.floating) if numpy else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def _bounds(minimum: float | None, maximum: float | None, positive: bool) -> str:
    parts = []
    if positive:
        parts.append("> 0")
    elif minimum is not None:
        parts.append(f">= {minimum}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return (" " + " and ".join(parts)) if parts else ""


def require_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None, *, numpy: bool = False
) -> int:
    """`value` if it is an int in [minimum, maximum] (None: open side; `numpy`: a numpy integer
    counts, see is_int); ValueError otherwise."""
    if (
        not is_int(value, numpy=numpy)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(f"{name} must be an int{_bounds(minimum, maximum, False)}, got {value!r}")
    return value


def require_number(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None, *, positive: bool = False
) -> float:
    """`value` as a float if it is a finite number in [minimum, maximum] (and > 0 when
    `positive`); ValueError otherwise."""
    fits = is_number(value)
    if fits:
        fits = not (positive and value <= 0) and not (minimum is not None and value < minimum)
        fits = fits and not (maximum is not None and value > maximum)
    if not fits:
        raise ValueError(f"{name} must be a finite number{_bounds(minimum, maximum, positive)}, got {value!r}")
    return float(value)


def require_bool(name: str, value: object) -> bool:
    """`value` if it is a bool; ValueError otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def require_choice(name: str, value: object, choices: Collection[object]) -> object:
    """`value` if it is one of `choices`; ValueError otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def require_name(name: str, value: object) -> str:
    """`value` if it is a non-empty, non-blank str; ValueError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty name, got {value!r}")
    return value


__all__ = ["is_int", "is_number", "require_bool", "require_choice", "require_int", "require_name", "require_number"]
