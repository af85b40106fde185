"""A host and an image to key snapshot templates on, without QEMU or a build: shared by
the unit tests of machine/snapshot.py and machine/pool.py."""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_microvm.image import GuestImage
from pytest_microvm.machine.host import Capability, HostReport

YES, NO = Capability(True, "usable"), Capability(False, "missing")


def host_report(*, kvm: bool = False, vhost_vsock: bool = False, qemu: str | None = sys.executable) -> HostReport:
    """A host that allows cloning by default: userspace vsock (no vhost-vsock), a QEMU
    path that exists (the key stats it)."""
    return HostReport(kvm=YES if kvm else NO, vhost_vsock=YES if vhost_vsock else NO, qemu=qemu, qemu_version="7.2.0")


def guest_image(root: Path) -> GuestImage:
    """An image of small files (the key stats them; nothing boots them)."""
    directory = root / "image"
    directory.mkdir(exist_ok=True)
    (directory / "vmlinux").write_bytes(b"kernel" * 100)
    (directory / "initramfs.cpio").write_bytes(b"initramfs" * 100)
    return GuestImage(
        directory=directory,
        kernel=directory / "vmlinux",
        initramfs=directory / "initramfs.cpio",
        pvh=True,
        kernel_release="6.1.0-test",
        agent_version="test",
        modules=(),
        key="imagekey0123",
        module_groups=("9p", "blk", "overlay"),
    )
