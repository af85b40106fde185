"""What this host can do for microVMs, each answer with the reason behind it.

"Usable KVM" is more than /dev/kvm existing: on hosts that are themselves guests
without nested hardware virtualisation, /dev/kvm may be backed by kvm_pvm, under which
an ordinary guest kernel hangs (seen on Firecracker guests: SeaBIOS reaches "Booting from
ROM", then nothing for a minute). Such hosts get TCG, reported loudly.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from pytest_microvm import arch as arches
from pytest_microvm.options import ACCELS, VSOCKS  # the one list of each (the option table's)


@dataclass(frozen=True)
class Capability:
    usable: bool
    reason: str


@dataclass(frozen=True)
class HostReport:
    """What the host can do for guests of one architecture (``arch``: default the host's)."""

    kvm: Capability  # for guests of ``arch``: only the host's own architecture has it
    vhost_vsock: Capability
    qemu: str | None  # path of arch's qemu-system binary
    qemu_version: str | None
    arch: str = field(default_factory=arches.host_name)
    own_kvm: Capability | None = None  # KVM for the host's own architecture (when arch is another)

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm.usable else "tcg"

    def for_arch(self, name: str) -> HostReport:
        """The report for guests of architecture ``name``: its QEMU, and KVM only if it is
        the host's own. ConfigError for an architecture not supported."""
        arch = arches.get(name)
        if arch.name == self.arch:
            return self
        own = self.own_kvm or self.kvm
        host = arches.host_name()
        kvm = own if arch.native else Capability(
            False, f"KVM runs only {host} guests on this {host} host: {arch.name} guests run under TCG emulation"
        )  # fmt: skip
        qemu = shutil.which(arch.qemu_binary)
        return replace(
            self, arch=arch.name, kvm=kvm, own_kvm=own, qemu=qemu, qemu_version=qemu_version(qemu) if qemu else None
        )

    def missing_qemu(self) -> str:
        """The error for a report without QEMU: what to install."""
        arch = arches.get(self.arch)
        return f"{arch.qemu_binary} is not installed (Debian/Ubuntu: apt-get install {arch.qemu_package})"


def _kvm(root: Path, arch: arches.Arch) -> Capability:
    dev = root / "dev" / "kvm"
    if not dev.exists():
        return Capability(False, "/dev/kvm does not exist (no KVM module, or not passed into this container)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Capability(False, "/dev/kvm is not read/writable by this user (add it to the kvm group)")
    if (root / "sys" / "module" / "kvm_pvm").exists():
        return Capability(False, "/dev/kvm is backed by kvm_pvm, which hangs ordinary guest kernels")
    try:
        cpuinfo = (root / "proc" / "cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    why = arch.kvm_capable(cpuinfo)
    if why is not None:
        return Capability(False, why)
    return Capability(True, "/dev/kvm is usable and the CPU has hardware virtualisation")


def _vhost_vsock(root: Path) -> Capability:
    dev = root / "dev" / "vhost-vsock"
    if not dev.exists():
        return Capability(
            False, "/dev/vhost-vsock does not exist (modprobe vhost_vsock, or pass it into the container)"
        )
    if not os.access(dev, os.R_OK | os.W_OK):
        return Capability(False, "/dev/vhost-vsock is not read/writable by this user")
    return Capability(True, "/dev/vhost-vsock is usable")


def qemu_version(qemu: str) -> str | None:
    """What ``qemu --version`` says; asked once per binary (path, size, mtime) per process."""
    try:
        st = os.stat(qemu)
    except OSError:
        return None
    return _qemu_version(qemu, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _qemu_version(qemu: str, _size: int, _mtime: int) -> str | None:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else None


def detect_host(root: Path = Path("/"), arch: str | None = None) -> HostReport:
    """Probe the host for guests of ``arch`` (default: the host's own); ``root`` lets tests
    point it at a fake /dev, /proc and /sys."""
    native = arches.get()
    report = _detect(root, native)
    return report if arch is None else report.for_arch(arch)


def _detect(root: Path, native: arches.Arch) -> HostReport:
    qemu = shutil.which(native.qemu_binary)
    return HostReport(
        arch=native.name,
        kvm=_kvm(root, native),
        vhost_vsock=_vhost_vsock(root),
        qemu=qemu,
        qemu_version=qemu_version(qemu) if qemu else None,
    )


@dataclass(frozen=True)
class Choice:
    """What a VM will use on this host, and why (for the pytest header and `doctor`)."""

    accel: str
    vsock: str
    why: str


def choose(report: HostReport, accel: str = "auto", vsock: str = "auto") -> Choice:
    """Pick the accelerator and vsock flavour; forcing what the host cannot do is a ConfigError."""
    from pytest_microvm.errors import ConfigError

    if accel not in ACCELS:
        raise ConfigError(f"accel must be one of {', '.join(ACCELS)}, not {accel!r}")
    if vsock not in VSOCKS:
        raise ConfigError(f"vsock must be one of {', '.join(VSOCKS)}, not {vsock!r}")
    if accel == "kvm" and not report.kvm.usable:
        raise ConfigError(f"accel=kvm was forced, but {report.kvm.reason}; use accel=tcg or auto")
    if vsock == "kernel" and not report.vhost_vsock.usable:
        raise ConfigError(f"vsock=kernel was forced, but {report.vhost_vsock.reason}; use vsock=userspace or auto")
    chosen_accel = accel if accel != "auto" else report.accel
    if vsock != "auto":
        chosen_vsock, vsock_why = vsock, f"asked for; {report.vhost_vsock.reason}"
    elif not report.vhost_vsock.usable:
        chosen_vsock, vsock_why = "userspace", report.vhost_vsock.reason
    else:
        # The fast path: vhost works the queues in the host kernel (under KVM notified
        # through ioeventfd/irqfd), no backend process starts per VM, and a snapshot clone
        # maps its template's RAM copy-on-write instead of copying it. Measured side by side
        # in one nested TCG guest (bench/kernel_clones.py): a clone ready in 0.66x the
        # userspace clone's time, holding 29 MiB of host memory idle against 70 MiB.
        chosen_vsock, vsock_why = (
            "kernel",
            "/dev/vhost-vsock is usable: no backend process per VM, and copy-on-write snapshot clones",
        )
    why = f"accel={chosen_accel} ({report.kvm.reason}); vsock={chosen_vsock} ({vsock_why})"
    return Choice(chosen_accel, chosen_vsock, why)
