"""The built image boots under QEMU with the agent as PID 1 and the vsock modules loaded.

Real QEMU, real kernel, real initramfs: under TCG on hosts without usable KVM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_microvm import BootError, GuestImage
from pytest_microvm.machine import HostReport, QemuProcess, qemu_argv

BOOT_TIMEOUT = 120  # TCG on a loaded 2-core runner; a normal boot takes 2-4 s


def boot(image: GuestImage, host: HostReport, tmp_path: Path, cmdline: tuple[str, ...] = ()) -> QemuProcess:
    assert host.qemu is not None
    console = tmp_path / "console.log"
    argv = qemu_argv(image, qemu=host.qemu, accel=host.accel, console=console, cmdline=cmdline)
    return QemuProcess(argv, console, tmp_path / "qemu.stderr")


def test_agent_runs_as_pid1_and_loads_the_vsock_modules(
    microvm_image: GuestImage, host: HostReport, tmp_path: Path
) -> None:
    assert microvm_image.pvh, "the Debian kernel has CONFIG_PVH: the builder must extract the vmlinux"
    needles = [f"microvm-agent: {microvm_image.agent_version} running as PID 1"]
    needles += [f"microvm-agent: loaded module {m}" for m in microvm_image.modules]
    with boot(microvm_image, host, tmp_path, ("microvm.port=4321",)) as vm:
        text = vm.wait_for_console(needles, timeout=BOOT_TIMEOUT)
        # It read its settings from the kernel command line and is trying to reach the host.
        vm.wait_for_console(["microvm-agent: host is vsock 2:4321"], timeout=BOOT_TIMEOUT)
        pid = vm.pid
    assert {"vsock.ko", "vmw_vsock_virtio_transport.ko", "virtio_pci.ko"} <= set(microvm_image.modules)
    assert "loading module" not in text  # no module failed to load
    assert vm.returncode() is not None  # stopped with the context
    assert not Path(f"/proc/{pid}").exists()


def test_a_guest_panic_is_reported_at_once_with_the_console(
    microvm_image: GuestImage, host: HostReport, tmp_path: Path
) -> None:
    # No such init: the kernel panics; panic=-1 + -no-reboot make QEMU exit right away.
    start = time.monotonic()
    with boot(microvm_image, host, tmp_path, ("rdinit=/no-such-init",)) as vm, pytest.raises(BootError) as info:
        vm.wait_for_console(["never printed"], timeout=BOOT_TIMEOUT)
    assert time.monotonic() - start < 60
    assert "panic" in str(info.value).lower()
    assert "Kernel panic" in info.value.console_tail


def test_cli_image_check(microvm_image: GuestImage) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "image", "check", "--timeout", str(BOOT_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "running as PID 1" in proc.stdout
    assert f"loaded {len(microvm_image.modules)} modules" in proc.stdout


def test_cli_image_build_prints_the_paths(microvm_image: GuestImage) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "image", "build"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert f"initramfs: {microvm_image.initramfs}" in proc.stdout
    assert f"kernel:    {microvm_image.kernel}" in proc.stdout
