"""Peak resident memory of this process by phase (fingerprint, training), for the summary.

Linux keeps the peak RSS (VmHWM in /proc/self/status) and resets it when "5" is written to
/proc/self/clear_refs, so a phase's own peak is measured by resetting at its start and
reading at its end. Elsewhere the reading falls back to the lifetime peak (getrusage),
which only bounds the phase from above. Several nodes in one process share one reading.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _vm(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MB (MiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRss:
    """Reset the peak at construction; `read_mb()` gives the peak since then (MiB)."""

    def __init__(self) -> None:
        try:
            _CLEAR.write_text("5")
            self.phase_only = True
        except OSError:
            self.phase_only = False

    def read_mb(self) -> float | None:
        peak = _vm("VmHWM") if self.phase_only else None
        if peak is not None:
            return round(peak, 1)
        scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, kB elsewhere
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)
