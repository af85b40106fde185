"""The pytest plugin (entry point ``pytest11: microvm``): options, header, fixtures.

What a suite gets today: the pytest header says which accelerator this host gives
guests and why, and the session fixture ``microvm_image`` builds (or finds in the
cache) the guest image once, safely across xdist workers (the builder locks).
"""

from __future__ import annotations

import os

import pytest

from pytest_microvm.image import GuestImage, build_image
from pytest_microvm.machine import detect_host


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvm", "QEMU microVMs (pytest-microvm)")
    group.addoption(
        "--microvm-kernel",
        dest="microvm_kernel",
        default=None,
        help="guest kernel: bzImage, vmlinux or .deb (default: Debian's linux-image-amd64). Ini: microvm_kernel",
    )
    group.addoption(
        "--microvm-modules",
        dest="microvm_modules",
        default=None,
        help="lib/modules/<release> tree for --microvm-kernel. Ini: microvm_modules",
    )
    group.addoption(
        "--microvm-cache-dir",
        dest="microvm_cache_dir",
        default=None,
        help="where images are built and cached (default: $MICROVM_CACHE_DIR or ~/.cache/pytest-microvm). "
        "Ini: microvm_cache_dir",
    )
    for name, text in (
        ("microvm_kernel", "default for --microvm-kernel"),
        ("microvm_modules", "default for --microvm-modules"),
        ("microvm_cache_dir", "default for --microvm-cache-dir"),
    ):
        parser.addini(name, text, default=None)


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    if value and name in ("microvm_kernel", "microvm_modules") and not os.path.exists(str(value)):
        raise pytest.UsageError(f"--{name.replace('_', '-')}: {value} does not exist")
    return str(value) if value else None


def pytest_configure(config: pytest.Config) -> None:
    for name in ("microvm_kernel", "microvm_modules"):
        _setting(config, name)


def pytest_report_header(config: pytest.Config) -> list[str]:
    host = detect_host()
    qemu = f"QEMU {host.qemu_version}" if host.qemu else "QEMU not found (apt-get install qemu-system-x86)"
    line = f"microvm: accel={host.accel} ({host.kvm.reason}); {qemu}"
    if host.accel == "tcg":
        line += " -- WARNING: guests run under TCG emulation, several times slower than KVM"
    return [line]


@pytest.fixture(scope="session")
def microvm_image(pytestconfig: pytest.Config) -> GuestImage:
    """The guest image, built once per session (cached across sessions, locked across workers)."""
    return build_image(
        kernel=_setting(pytestconfig, "microvm_kernel"),
        modules=_setting(pytestconfig, "microvm_modules"),
        cache=_setting(pytestconfig, "microvm_cache_dir"),
    )
