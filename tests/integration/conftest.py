"""Integration tests boot real QEMU guests; they need qemu-system-x86_64 (TCG is fine)."""

from __future__ import annotations

import pytest

from pytest_microvm.machine import HostReport, detect_host


@pytest.fixture(scope="session")
def host() -> HostReport:
    report = detect_host()
    if report.qemu is None:
        # Not a skip: .ci/run installs QEMU, so its absence is a broken setup, not a limitation.
        pytest.fail("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return report


@pytest.fixture(scope="session")
def session_kernel(microvm_kernel: str | None) -> str | None:
    """The kernel this test's images use (--microvm-kernel / ini; in a kernel matrix, this
    test's entry), for tests that build images of their own: a run with --microvm-kernel
    source tests that kernel throughout."""
    return microvm_kernel
