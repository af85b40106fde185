"""Waits that Ctrl-C and SIGTERM can always cut short.

Python runs signal handlers in the main thread only, once that thread is back in the
interpreter. The kernel hands a signal sent to the process to any thread that does not
block it: when it picks another one (an agent connection's reader, the clone pool), a main
thread blocked in a lock, a condition, a join or a socket wait without a timeout is not
woken, and the interrupt waits until that wait ends by itself. Seen in a loaded test run: a
Ctrl-C during a test's ``vm.run(["sleep", "60"])`` took effect 60 s late. So every wait
that can be long waits in slices of :data:`SLICE` seconds and checks again.

:func:`until` is the one polling loop: code that waits for a condition of the machine
(a file, a process's exit, QEMU's migration state) says what to check and how often.
:func:`until_deadline` retries a call that fails until it succeeds (tenacity).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

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


def until(check: Callable[[], T | None], deadline: float | None, interval: float) -> T | None:
    """Call ``check`` every ``interval`` seconds (at most :data:`SLICE`) until it returns
    something other than None, and return that; None once ``deadline`` (a
    ``time.monotonic()`` value; None: no limit) has passed. ``check`` runs at least once,
    and once more at the deadline; what it raises ends the wait."""
    while True:
        result = check()
        if result is not None:
            return result
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        time.sleep(min(interval, slice_of(remaining)))


def until_deadline(
    deadline: float, errors: tuple[type[BaseException], ...], call: Callable[[], T], interval: float = 0.05
) -> T:
    """``call()`` again every ``interval`` seconds while it raises one of ``errors``; once
    ``deadline`` (``time.monotonic()``) has passed, the last such error is raised."""
    from tenacity import Retrying, retry_if_exception_type, wait_fixed

    retrying = Retrying(
        retry=retry_if_exception_type(errors),
        stop=lambda _state: time.monotonic() > deadline,
        wait=wait_fixed(min(interval, SLICE)),
        reraise=True,
    )
    return retrying(call)
