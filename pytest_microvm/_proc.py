"""Child processes that cannot outlive us: spawn with PR_SET_PDEATHSIG, stop in bounded time."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
from collections.abc import Sequence
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


def load_libc() -> ctypes.CDLL:
    # In the parent, once: find_library may run ldconfig, which has no place between fork
    # and exec (and, cached only in the child, it ran on every spawn).
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def set_parent_death_signal() -> None:
    """SIGKILL this process when the thread that forked it exits (PR_SET_PDEATHSIG).

    For a child between fork and exec, or a forked child that never execs; call
    :func:`load_libc` before the fork (it may run ldconfig, which has no place there).
    The thread matters: spawn from a long-lived one (the main one, a pool's)."""
    assert _libc is not None, "load_libc() before the fork"
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (a list, never a shell string) so that it dies with this process.

    Its stdio is /dev/null unless given: a child that inherited ours would hold the
    caller's pipes open (``$(microvm run --keep ...)`` would never return).

    ``die_with_parent=False`` only for processes the user asked to keep (debugging a
    failed test's VM after pytest exits); they also get their own session.
    """
    if die_with_parent:
        load_libc()
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=set_parent_death_signal if die_with_parent else None,
        start_new_session=not die_with_parent,
        close_fds=True,
        pass_fds=tuple(pass_fds),
    )


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps. Returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
