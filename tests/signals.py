"""Signal dispositions for the processes tests start, whatever the suite inherited.

A process started in the background by a non-interactive shell (``cmd &`` in a script,
``nohup``, several CI runners) starts with SIGINT and SIGQUIT ignored, its children
inherit that, and an ignored signal stays ignored across ``execve``. A test that sends a
signal must give its target the disposition it relies on (:func:`defaults`); a test of
how something copes with an inherited ignore sets one up itself (:func:`ignoring`).
Both return a ``preexec_fn`` for :class:`subprocess.Popen`.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

BACKGROUND = (signal.SIGINT, signal.SIGQUIT)  # what `cmd &` in a script ignores


def defaults(*signals: signal.Signals) -> Callable[[], None]:
    """Reset ``signals`` (default: SIGINT and SIGQUIT) to their default action in the child."""

    def preexec() -> None:
        for sig in signals or BACKGROUND:
            signal.signal(sig, signal.SIG_DFL)

    return preexec


def ignoring(*signals: signal.Signals) -> Callable[[], None]:
    """Ignore ``signals`` (default: as a script's background job does) in the child."""

    def preexec() -> None:
        for sig in signals or BACKGROUND:
            signal.signal(sig, signal.SIG_IGN)

    return preexec


def ignored(status: bytes) -> set[int]:
    """The signals a process ignores, from its ``/proc/PID/status`` (the SigIgn mask)."""
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith(b"SigIgn:"))
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}
