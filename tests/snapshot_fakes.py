"""What the unit tests of machine/snapshot/ and machine/pool.py share, without QEMU or a
build: a host and an image to key snapshot templates on, sparse files, a template's
files on disk, and a census of this process's open descriptors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pytest_microvm.image import GuestImage
from pytest_microvm.machine.host import Capability, HostReport

YES, NO = Capability(True, "usable"), Capability(False, "missing")
MIB = 1 << 20


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


def targets(fds: set[str]) -> dict[str, str]:
    """What each of ``fds`` is open on; those closed meanwhile (a copy thread's, when its
    copy ends) are left out."""
    found = {}
    for fd in fds:
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
    return found


def open_fds() -> set[str]:
    """This process's open descriptors (compare before and after to find a leak); not the
    one listing them, closed by the time they are looked at."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        fds.add(fd)
    return fds


def allocated(path: Path) -> int:
    """Bytes the file system holds for ``path`` (less than its size when it has holes)."""
    return path.stat().st_blocks * 512


def sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> bytes:
    """A file of ``size`` bytes with data only at the given offsets; returns its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def write_template(
    directory: Path,
    *,
    key: str = "somekey",
    template_id: str = "id-one",
    token: str = "tok",
    memory_mib: int = 8,
    chunks: dict[int, bytes] | None = None,
    state: bytes = b"device state",
) -> bytes:
    """The files of a sound template in ``directory`` (a sparse ``ram`` of ``memory_mib``
    MiB, ``state``, ``template.json``); returns its RAM's content."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "id": template_id, "token": token, "memory_mib": memory_mib, "made": 1.0}
    (directory / "template.json").write_text(json.dumps(meta))
    content = sparse_file(directory / "ram", memory_mib * MIB, chunks or {})
    (directory / "state").write_bytes(state)
    return content


def rewrite_meta(directory: Path, **changes: object) -> None:
    """Change fields of ``directory/template.json`` (None: remove the field)."""
    path = directory / "template.json"
    meta = json.loads(path.read_text())
    for name, value in changes.items():
        if value is None:
            del meta[name]
        else:
            meta[name] = value
    path.write_text(json.dumps(meta))
