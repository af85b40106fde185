"""`microvm run` as a user runs it: a subprocess that boots a real guest."""

from __future__ import annotations

import subprocess
import sys

from pytest_microvm import GuestImage


def microvm(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", *args], capture_output=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_run_streams_output_and_exits_with_the_commands_status(microvm_image: GuestImage) -> None:
    proc = microvm("run", "--", "sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"out\n"
    assert proc.stderr.endswith(b"err\n")


def test_run_reports_death_by_signal_as_128_plus_n(microvm_image: GuestImage) -> None:
    assert microvm("run", "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9


def test_run_without_a_command_is_a_usage_error() -> None:
    proc = microvm("run")
    assert proc.returncode == 2 and b"nothing to run" in proc.stderr
