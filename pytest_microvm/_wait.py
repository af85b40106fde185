"""Waits that Ctrl-C and SIGTERM can always cut short.

Python runs signal handlers in the main thread only, once that thread is back in the
interpreter. The kernel hands a signal sent to the process to any thread that does not
block it: when it picks another one (an agent connection's reader, the clone pool), a main
thread blocked in a lock, a condition, a join or a socket wait without a timeout is not
woken, and the interrupt waits until that wait ends by itself. Seen in a loaded test run: a
Ctrl-C during a test's ``vm.run(["sleep", "60"])`` took effect 60 s late. So every wait
that can be long waits in slices of :data:`SLICE` seconds and checks again.
"""

from __future__ import annotations

import threading
import time

SLICE = 0.25  # the longest a pending Ctrl-C or SIGTERM waits to be raised


def slice_of(remaining: float | None) -> float:
    """How long to wait this time, for a wait with ``remaining`` seconds left (None: no limit)."""
    return SLICE if remaining is None else max(0.0, min(remaining, SLICE))


def join(thread: threading.Thread, timeout: float | None = None) -> bool:
    """``thread.join(timeout)`` in slices; True if the thread ended."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        thread.join(slice_of(remaining))
    return not thread.is_alive()


def acquire(lock: threading.Semaphore | threading.Lock) -> None:
    """``lock.acquire()`` with no limit, in slices."""
    while not lock.acquire(timeout=SLICE):
        pass
