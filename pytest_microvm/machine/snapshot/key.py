"""Whether a configuration can be a clone here, and the key of the template it clones.

A saved guest is valid for one exact QEMU build, machine, accelerator, CPU, memory, image,
kernel command line and device list: the key covers all of them, so a template from
anything else is never loaded (and a bad one costs one boot, never a failed test).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pytest_microvm import arch as arches
from pytest_microvm.image import GuestImage
from pytest_microvm.image.builder import HOST_ROOT
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import HostReport, choose

TEMPLATE_FORMAT = "3"  # bump when what a template holds or how it is made changes


def why_not(config: VMConfig, host: HostReport, *, hooked: bool = False) -> str | None:
    """Why ``config`` cannot be a clone here, or None when it can."""
    if not config.snapshot:
        return "snapshot=False"
    if config.keep:
        return "kept VMs boot (a clone's RAM lives only as long as this process)"
    if config.network:
        return "VMs with network=True boot (their forwarded host ports are their own)"
    if hooked:
        return "a pytest_microvm_qemu_args hook rewrites the QEMU command line"
    if config.rootfs == HOST_ROOT:
        return "the host's / is a mounted 9p share from the first moment, which QEMU cannot migrate"
    if host.qemu is None:
        return "QEMU is not installed"
    return None


def _file_identity(path: Path | None) -> list[Any]:
    if path is None:
        return []
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def template_key(config: VMConfig, image: GuestImage, host: HostReport, *, cpu: str | None = None) -> str:
    """Everything that makes a saved guest unusable if it changes: the QEMU binary and
    version, machine, accelerator, CPU, memory, vCPUs, the image's files, the kernel
    command line, the devices (the vsock flavour, shares, extra QEMU arguments) and the
    agent's port. ``cpu``: the host CPU's identity under KVM (default: :func:`host_cpu`)."""
    assert host.qemu is not None
    choice = choose(host, config.accel, config.vsock)
    parts = {
        "format": TEMPLATE_FORMAT,
        "qemu": [*_file_identity(Path(host.qemu)), host.qemu_version],
        "arch": config.arch,
        "machine": arches.get(config.arch).machine(choice.accel),
        "accel": choice.accel,
        # Under KVM the guest runs on the host's CPU (-cpu host) and KVM's view of it: a
        # template from another CPU or host kernel (a cache shared by CI runners) would
        # fault. Under TCG the CPU is QEMU's own model.
        "cpu": (cpu or host_cpu()) if choice.accel == "kvm" else "qemu-default",
        "vsock": choice.vsock,
        "memory_mib": config.memory_mib,
        "vcpus": config.vcpus,
        "image": [image.key, *_file_identity(image.kernel), *_file_identity(image.initramfs)],
        "root_disk": _file_identity(image.root_disk),
        "cmdline": list(config.kernel_cmdline),
        "qemu_args": list(config.qemu_args),
        # Only how many: their tags are share0..N, and their host paths and modes live in
        # QEMU's fsdev, not in the guest or the saved state (and they are mounted after
        # the restore), so a test's own tmp_path share still clones from one template.
        "shares": len(config.share_list()),
        "port": config.port,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo"), kernel_release: str | None = None) -> str:
    """The host CPU's model, flags and microcode, and the host kernel: what a KVM guest sees
    (not the clock, which differs between reads)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    first = text.split("\n\n")[0]  # one processor's entry: model, flags, microcode
    wanted = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode", "flags")
    lines = [line for line in first.splitlines() if line.split(":")[0].strip() in wanted]
    release = os.uname().release if kernel_release is None else kernel_release
    return hashlib.sha256("\n".join([release, *lines]).encode()).hexdigest()[:16]
