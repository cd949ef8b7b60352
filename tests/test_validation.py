"""The shared checks: a bool is never an int or a number; numpy scalars only when asked;
non-finite floats only when asked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atlas_p2p.validation import is_int, is_number, require_int


@pytest.mark.parametrize(
    "value, plain, with_numpy",
    [
        (3, True, True),
        (-1, True, True),
        (True, False, False),
        (np.int64(3), False, True),
        (np.bool_(True), False, False),
        (3.0, False, False),
        ("3", False, False),
        (None, False, False),
    ],
)
def test_is_int(value, plain, with_numpy):
    assert is_int(value) is plain
    assert is_int(value, numpy=True) is with_numpy


@pytest.mark.parametrize(
    "value, finite, any_float, with_numpy",
    [
        (1, True, True, True),
        (0.5, True, True, True),
        (False, False, False, False),
        (math.inf, False, True, False),
        (math.nan, False, True, False),
        (np.float32(0.5), False, False, True),
        (np.int64(2), False, False, True),
        ("1", False, False, False),
    ],
)
def test_is_number(value, finite, any_float, with_numpy):
    assert is_number(value) is finite
    assert is_number(value, finite=False) is any_float
    assert is_number(value, numpy=True) is with_numpy


def test_require_int_takes_a_numpy_int_only_when_asked():
    assert require_int("version", np.int64(4), 1, numpy=True) == 4
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        require_int("version", np.int64(4), 1)
