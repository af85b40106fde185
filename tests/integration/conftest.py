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
def session_kernel(pytestconfig: pytest.Config) -> str | None:
    """The kernel this session's images use (--microvm-kernel / ini), for tests that build
    images of their own: a run with --microvm-kernel source tests that kernel throughout."""
    return pytestconfig.getoption("microvm_kernel") or pytestconfig.getini("microvm_kernel") or None
