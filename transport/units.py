"""Parse human sizes and rates from the command line: "8GB", "2GiB", "50Mbps", "1Gbps".

Sizes are bytes. Decimal prefixes are powers of 1000 (kB, MB, GB, TB), binary ones
powers of 1024 (KiB, MiB, GiB, TiB); the letters' case does not matter ("512mb" is
512 MB). Rates are bits per second: "<n><prefix>bps" counts bits, "<n><prefix>B/s" or
"<n><prefix>Bps" counts bytes (x 8); here the case of b/B matters, as in networking.
"""

from __future__ import annotations

import math
import re

from atlas_p2p.validation import is_int

_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
_SIZE_RE = re.compile(rf"^{_NUMBER}([a-zA-Z]*)\s*$")
_RATE_RE = re.compile(rf"^{_NUMBER}([kKmMgGtT]?)(bps|bit/s|Bps|B/s)\s*$")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_RATE_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _positive(number: str, text: str, what: str) -> float:
    value = float(number)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} {text!r} must be a positive finite number")
    return value


def parse_size(text: str) -> int:
    """'8GB' -> 8_000_000_000, '2GiB' -> 2_147_483_648, '512MB', '4096' (bytes). ValueError otherwise."""
    if not (is_int(text) or isinstance(text, str)):
        raise ValueError(f"size must be a string like '8GB' or '2GiB', got {text!r}")
    if isinstance(text, int):
        text = str(text)
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number and a unit such as 512MB, 8GB or 2GiB "
            f"(units: {', '.join(u for u in ('B', 'kB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))})"
        )
    size = _positive(match.group(1), text, "size") * _SIZE_UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"size {text!r} is too large to be a size")
    if size < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    return int(round(size))


def parse_rate(text: str) -> float:
    """'50Mbps' -> 50e6 bits/s, '1Gbps' -> 1e9, '10MB/s' -> 80e6. ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"rate must be a string like '50Mbps', got {text!r}")
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(
            f"cannot read rate {text!r}: write a number and a unit such as 50Mbps, 1Gbps "
            f"(bits per second) or 10MB/s (bytes per second)"
        )
    number, prefix, unit = match.groups()
    bits_per_unit = 8 if unit in ("Bps", "B/s") else 1
    rate = _positive(number, text, "rate") * _RATE_PREFIX[prefix.lower()] * bits_per_unit
    if not math.isfinite(rate):
        raise ValueError(f"rate {text!r} is too large to be a rate")
    return rate
