"""bench/peers.py records a peer's failed run, retries it once and finishes; no VM is booted."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

PEERS = Path(__file__).resolve().parents[2] / "bench" / "peers.py"


def load_peers() -> ModuleType:
    # bench/ is a directory of scripts, not a package: import the file by path.
    spec = importlib.util.spec_from_file_location("bench_peers", PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


peers = load_peers()


def attempt_from(runs: list[object]) -> tuple[list[int], Callable[[], object]]:
    """A stand-in for one try of virtme-ng: hands out `runs` in order and counts the calls."""
    calls: list[int] = []
    it = iter(runs)

    def attempt() -> object:
        calls.append(1)
        return next(it)

    return calls, attempt


def test_a_run_that_ran_the_first_time_is_not_retried() -> None:
    calls, attempt = attempt_from([peers.PeerRun(4.2, True)])
    assert peers.with_one_retry(attempt) == (4.2, [])
    assert len(calls) == 1


def test_a_failed_try_is_counted_and_retried_once() -> None:
    bad = peers.PeerRun(9.0, False, "exit status 255, no marker in the output")
    calls, attempt = attempt_from([bad, peers.PeerRun(4.5, True)])
    assert peers.with_one_retry(attempt) == (4.5, [bad])
    assert len(calls) == 2


def test_two_failed_tries_give_no_time_and_no_third_try() -> None:
    first, second = peers.PeerRun(9.0, False, "a"), peers.PeerRun(300.0, False, "timed out after 300s")
    calls, attempt = attempt_from([first, second, peers.PeerRun(1.0, True)])
    assert peers.with_one_retry(attempt) == (None, [first, second])
    assert len(calls) == 2


def test_the_marker_is_printed_by_the_command_not_written_in_it() -> None:
    command, marker = peers.marked_command("0123abcd")
    assert marker not in command  # echoing the command line (vng --verbose) is not a run
    assert peers.marked_command("ffff0000")[1] != marker


@pytest.mark.parametrize(
    ("returncode", "output", "ran"),
    [
        (255, b"[    1.2] virtme-init: console fallback\r\nPEER-RAN-0123abcd\r\n", True),  # 255, yet it ran
        (0, b"PEER-RAN-0123abcd\n", True),
        (0, b"", False),  # a clean exit status alone is not a run
        (255, b"vng --exec printf 'PEER-RAN-%s\\n' 0123abcd\n", False),  # only the command line echoed
        (255, b"PEER-RAN-ffff0000\n", False),  # another run's marker
    ],
    ids=["exit-255-with-marker", "exit-0-with-marker", "exit-0-silent", "command-echoed", "other-marker"],
)
def test_a_run_is_judged_by_its_output_not_its_exit_status(returncode: int, output: bytes, ran: bool) -> None:
    _command, marker = peers.marked_command("0123abcd")
    run = peers.judge(3.0, returncode, output, marker)
    assert run.ran is ran and run.seconds == 3.0
    if not ran:
        assert f"exit status {returncode}" in run.why


def test_the_table_row_shows_failed_tries() -> None:
    row = peers.fresh_vm_row([1.0, 1.5, 2.0], [4.0, 5.0, 6.0], 1, "ok")
    assert "5.00" in row and "3.3x" in row and "failed 1 of 4 tries" in row
    assert "failed" not in peers.fresh_vm_row([1.0], [4.0], 0, "ok")
    assert "failed all 2 tries" in peers.fresh_vm_row([1.0], [], 2, "ok")
    assert "virtme-ng not installed" in peers.fresh_vm_row([1.0], [], 0, "virtme-ng not installed")
