"""SIGTERM unwinds a pytest session as Ctrl-C does: fixtures torn down, VMs stopped.

SIGTERM is how a CI timeout, a job cancellation or ``kill`` stops a run, and the only way
to stop one started in the background by a script (which ignores SIGINT). Left at its
default, it kills pytest on the spot: QEMU and the vsock backend die with it
(PR_SET_PDEATHSIG), but work directories stay behind and nothing says why.

With xdist the workers run the tests and hold the VMs, so the controller passes the
signal on to them before it unwinds itself, as a Ctrl-C at a terminal reaches them all.
A second SIGTERM kills the process outright.

The controller gives its workers 10 s to exit once it unwinds (xdist), and execnet
interrupts a worker's main thread with a SIGINT after 5 s of them: a worker whose session
was interrupted therefore ignores further SIGINTs while it tears down (:meth:`shield`),
which stays short because interrupted VMs are stopped, not powered off from inside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: pytest reports it as an interruption and tears down as after Ctrl-C."""


class SigtermUnwinds:
    """The SIGTERM handler of one pytest process (a controller or an xdist worker)."""

    def __init__(self) -> None:
        self.workers: set[int] = set()  # xdist workers' pids: they get the signal first
        self._previous: Any = None
        self._installed = False
        self._raised = False
        self._sigint: Any = None  # SIGINT's handler before shield()

    def install(self) -> None:
        """Take SIGTERM, unless someone else handles it (a user's handler stays) or this is
        not the main thread (only it can take signals)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._installed = False
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def shield(self) -> None:
        """The session was interrupted and tears down now: in an xdist worker, a SIGINT
        (execnet's own, after 5 s) must not cut that short. The bound on it is xdist's:
        the controller kills a worker that has not exited 10 s after it asked."""
        if threading.current_thread() is threading.main_thread() and self._sigint is None:
            self._sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._raised:
            # The unwind is under way and someone insists: the default action, now.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._raised = True
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        raise Terminated(f"SIGTERM (signal {signum}): stopping the VMs and unwinding")
