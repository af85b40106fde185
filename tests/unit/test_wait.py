"""pytest_microvm/_wait.py: a signal the kernel hands to another thread still interrupts a
waiting main thread within a slice, where a plain wait holds it until the wait ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from pytest_microvm import _wait
from tests.agent_harness import reaping

# The main thread blocks SIGUSR1, so the kernel must hand it to another thread; Python then
# runs the handler in the main thread as soon as that thread is back in the interpreter.
CHILD = """
import os, signal, threading, time
from pytest_microvm import _wait

class Interrupted(Exception):
    pass

def interrupt(*_):
    raise Interrupted

signal.signal(signal.SIGUSR1, interrupt)
sleeper = threading.Thread(target=time.sleep, args=(6,), daemon=True)
sleeper.start()
threading.Thread(target=lambda: (time.sleep(0.3), os.kill(os.getpid(), signal.SIGUSR1)), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
started = time.monotonic()
try:
    {wait}
    print("never interrupted")
except Interrupted:
    print(f"interrupted after {{time.monotonic() - started:.2f}}")
"""


def _interrupted_after(wait: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(wait=wait)], stdout=subprocess.PIPE, text=True)
    with reaping(proc):
        out = proc.communicate(timeout=30)[0]
    assert out.startswith("interrupted after"), out
    return float(out.split()[-1])


@pytest.mark.parametrize(
    "wait",
    [
        "_wait.join(sleeper)",
        "c = threading.Condition(); c.acquire(); [c.wait(_wait.slice_of(None)) for _ in iter(int, 1)]",
        "s = threading.Semaphore(0); _wait.acquire(s)",
    ],
    ids=["join", "condition", "semaphore"],
)
def test_a_sliced_wait_lets_a_signal_through_at_once(wait: str) -> None:
    assert _interrupted_after(wait) < 2.0


def test_a_plain_wait_would_hold_it_until_the_wait_ends() -> None:
    # The case the slices are for: without them the interrupt waits for the 6 s sleeper.
    assert _interrupted_after("sleeper.join()") > 4.0


def test_a_bounded_join_returns_whether_the_thread_ended() -> None:
    code = textwrap.dedent(
        """
        import threading, time
        from pytest_microvm import _wait
        t = threading.Thread(target=time.sleep, args=(0.6,))
        t.start()
        print(_wait.join(t, 0.1), _wait.join(t, 5))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout
    assert out.split() == ["False", "True"]


def test_until_returns_the_first_answer_and_none_at_the_deadline() -> None:
    calls: list[float] = []

    def third_time() -> str | None:
        calls.append(time.monotonic())
        return "ready" if len(calls) == 3 else None

    assert _wait.until(third_time, time.monotonic() + 5, 0.01) == "ready" and len(calls) == 3
    calls.clear()
    start = time.monotonic()
    assert _wait.until(lambda: calls.append(time.monotonic()), start + 0.2, 0.05) is None
    assert calls[-1] >= start + 0.2  # checked once more at the deadline
    assert 3 <= len(calls) <= 10


def test_until_ends_with_what_the_check_raises() -> None:
    def dead() -> None:
        raise RuntimeError("QEMU exited")

    with pytest.raises(RuntimeError, match="QEMU exited"):
        _wait.until(dead, None, 0.01)


def test_until_deadline_retries_the_named_errors_then_raises_the_last() -> None:
    attempts = []

    def refused_twice() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError(f"attempt {len(attempts)}")
        return "connected"

    assert _wait.until_deadline(time.monotonic() + 5, (ConnectionRefusedError,), refused_twice, 0.01) == "connected"

    def refused(n: list[int] = []) -> str:  # noqa: B006 (counts the calls)
        n.append(1)
        raise ConnectionRefusedError(f"attempt {len(n)}")

    with pytest.raises(ConnectionRefusedError, match=r"attempt ([3-9]|\d\d)"):  # retried, then the last error
        _wait.until_deadline(time.monotonic() + 0.1, (ConnectionRefusedError,), refused, 0.01)
    with pytest.raises(ValueError):  # not a named error: no retry
        _wait.until_deadline(time.monotonic() + 5, (ConnectionRefusedError,), lambda: int("x"), 0.01)
