"""The two vsock paths as a test parameter: userspace everywhere, kernel where /dev/vhost-vsock is usable.

The kernel cases carry the ``kernel_vsock`` marker: scripts/nested runs them inside a guest
that has /dev/vhost-vsock (CI); on a host without it they skip and say why.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_microvm.machine import detect_host


def kernel_path_missing() -> str:
    """Why the kernel vhost-vsock path cannot run here ("" if it can). KVM is not needed."""
    host = detect_host()
    return "" if host.vhost_vsock.usable else f"needs /dev/vhost-vsock: {host.vhost_vsock.reason}"


def needs_kernel_path(test: Any) -> Any:
    """For a test of the kernel path alone."""
    missing = kernel_path_missing()
    return pytest.mark.kernel_vsock(pytest.mark.skipif(bool(missing), reason=missing or "-")(test))


def path_params() -> list[Any]:
    """``params=`` for a fixture that gives a VM on each path."""
    missing = kernel_path_missing()
    return [
        pytest.param("userspace", id="userspace"),
        pytest.param(
            "kernel",
            id="kernel",
            marks=[pytest.mark.kernel_vsock, pytest.mark.skipif(bool(missing), reason=missing or "-")],
        ),
    ]


def path_launch_params(launches: tuple[str, ...] = ("boot", "clone")) -> list[Any]:
    """``params=`` of (path, launch) pairs: a VM on each path, booted or a snapshot clone."""
    return [
        pytest.param((path.values[0], how), id=f"{path.id}-{how}", marks=path.marks)
        for path in path_params()
        for how in launches
    ]
