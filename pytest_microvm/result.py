"""CommandResult: what one finished command produced (the value ``run()`` returns)."""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one command in the guest.

    ``exit_code`` is the exit status, or -1 when the process died by ``signal``.
    ``timed_out`` is set when the agent killed it because its timeout passed.
    ``duration`` is host wall time in seconds from sending EXEC to receiving EXIT.
    """

    argv: Sequence[str]
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        """True when the command exited 0 on its own."""
        return self.exit_code == 0 and not self.signal and not self.timed_out

    def describe(self) -> str:
        """One human sentence: exit code, signal or timeout, and the start of stderr."""
        if self.timed_out:
            what = "timed out"
        elif self.signal:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            what = f"killed by {name}"
        else:
            what = f"exit code {self.exit_code}"
        tail = self.stderr[-500:].decode(errors="replace").strip()
        return f"{what}; stderr: {tail!r}" if tail else what
