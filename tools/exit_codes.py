"""The one registry of `atlas-node` exit codes. Scripts may rely on these numbers."""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class ExitCode(IntEnum):
    """Process exit status of every `atlas-node` command."""

    OK = 0  # finished as asked (a node or bootstrap stopped by SIGINT/SIGTERM included)
    INTERNAL = 1  # a bug: unexpected exception (traceback in the log)
    USAGE = 2  # unknown command or flag, missing flag (what click reports)
    BAD_VALUE = 3  # a flag's value is malformed: size, rate, HOST:PORT, missing file
    UNREACHABLE = 4  # the bootstrap did not answer within the timeout
    ADDRESS_IN_USE = 5  # cannot bind the requested HOST:PORT
    STATE_ERROR = 6  # the --state directory cannot be used (not a dir, corrupt, locked)
    REJECTED = 7  # the bootstrap answered with an error (e.g. join refused)


def describe() -> str:
    """One line per code, for `--help` texts and docs."""
    return "\n".join(f"{code.value}: {code.name.lower()}" for code in ExitCode)
