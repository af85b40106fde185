"""Guest architectures: everything that differs between an x86_64 and an aarch64 guest,
behind one small interface (:class:`Arch`), chosen in one place (:func:`get`).

What an architecture decides: the QEMU binary and the Debian packages behind it, the
machine and CPU on its command line, the console device, the Debian architecture name
(kernel, busybox and packages= come from the same apt, keyed by it), the C compiler that
builds the agent, how a kernel file becomes what QEMU boots, whether KVM can run it on
this host, and what a snapshot clone's identity devices are.

Facts behind the choices (QEMU 7.2, TCG on an x86_64 host, Debian's 6.1 kernels, an init
that powers off at once, from QEMU's start to its exit):

- x86_64: q35 with the kernel's PVH entry (see :func:`pytest_microvm.machine.qemu.qemu_argv`).
- aarch64: ``virt`` (PCIe, like q35: both vsock devices and a ``pcie-root-port`` work the
  same). Under TCG the named core ``cortex-a57`` boots in 1.45 s where ``-cpu max`` takes
  5.9 s (its pointer authentication is slow to emulate). Under KVM (an arm64 host) the
  guest runs on ``-cpu host`` with the host's GIC version. The console is a PL011
  (``ttyAMA0``); Debian's arm64 kernel is an uncompressed ``Image``, booted as it is.
  Booted with ``-kernel`` the guest has a device tree, no ACPI: no vmgenid for clones
  (their RNG is reseeded by the agent's CLONE step all the same) and PCIe native hotplug
  (pciehp) instead of ACPI's for the userspace path's vsock device.

The standard library only: the option table and the pytest header read it.
"""

from __future__ import annotations

import os
import re
import shutil

TYPE_CHECKING = False  # the option table imports this module before anything heavy loads
if TYPE_CHECKING:
    from collections.abc import Callable

VMGENID_ID = "microvm-vmgenid"  # the device's id on QEMU's command line (QMP sees it)
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "x86-64": "x86_64"}


class Arch:
    """One guest architecture (the base holds what every one has; subclasses what differs)."""

    name: str  # as `uname -m` says it
    debian: str  # Debian's name: the apt architecture of kernel, busybox and packages=
    qemu_binary: str
    qemu_package: str  # the Debian/Ubuntu package that has qemu_binary
    kernel_package: str  # Debian's kernel metapackage
    console: str  # the serial console's device name in the guest
    elf_machine: int  # e_machine of its executables (a foreign binary is recognised by it)
    cross_compilers: tuple[str, ...]  # C compilers that build for it on another host
    cross_packages: str  # what brings one of them, with a static libc
    hotplug: str  # how a device is hot-plugged on its root port, for error messages
    # The kernel built from source: the kernel's ARCH=, the make target, the file it makes.
    linux_arch: str
    kernel_target: str
    kernel_output: str

    def __repr__(self) -> str:
        return f"<Arch {self.name}>"

    @property
    def native(self) -> bool:
        """True when this is the host's own architecture."""
        return self.name == host_name()

    def machine(self, accel: str) -> str:
        """The ``-machine`` value, before the memory backend is added."""
        raise NotImplementedError

    def cpu(self, accel: str) -> list[str]:
        """The ``-cpu`` arguments."""
        raise NotImplementedError

    def kvm_capable(self, cpuinfo: str) -> str | None:
        """Why this host's CPU cannot run KVM guests of this (its own) architecture, or None."""
        raise NotImplementedError

    def boot_kernel(self, raw: bytes, progress: Callable[[str], None]) -> tuple[str, bytes, bool]:
        """What QEMU boots from a kernel file: (file name, bytes, booted through PVH)."""
        raise NotImplementedError

    def identity_devices(self, guid: str) -> list[str]:
        """Devices that tell a snapshot clone apart from its siblings, as QEMU arguments."""
        raise NotImplementedError

    def compilers(self) -> list[str]:
        """The C compilers to try for the agent, in order: the host's own for its own
        architecture ($CC first), a cross compiler otherwise."""
        if self.native:
            return [c for c in (os.environ.get("CC"), "cc", "gcc") if c]
        return list(self.cross_compilers)

    def compiler_packages(self) -> str:
        return "gcc libc6-dev" if self.native else self.cross_packages

    def make_args(self) -> list[str]:
        """make's arguments that build a kernel for this architecture (a cross build on
        another host: the compiler of :attr:`cross_compilers`)."""
        if self.native:
            return []
        return [f"ARCH={self.linux_arch}", f"CROSS_COMPILE={self.cross_compilers[0].removesuffix('gcc')}"]

    def user_emulator(self) -> str | None:
        """The command that runs this architecture's programs on this host at build time
        (busybox's applet list, a root's Python bytecode): None for the host's own."""
        return None if self.native else f"qemu-{self.name}-static"


class X86_64(Arch):
    name = "x86_64"
    debian = "amd64"
    qemu_binary = "qemu-system-x86_64"
    qemu_package = "qemu-system-x86"
    kernel_package = "linux-image-amd64"
    console = "ttyS0"
    elf_machine = 62  # EM_X86_64
    cross_compilers = ("x86_64-linux-gnu-gcc",)
    linux_arch = "x86"
    kernel_target = "vmlinux"  # the ELF, booted through its PVH entry
    kernel_output = "vmlinux"
    cross_packages = "gcc-x86-64-linux-gnu libc6-dev-amd64-cross"
    hotplug = "PCIEPORTBUS, HOTPLUG_PCI and HOTPLUG_PCI_ACPI (Debian's and the source kernel have them)"

    def machine(self, accel: str) -> str:
        return f"q35,accel={accel}"

    def cpu(self, accel: str) -> list[str]:
        return ["-cpu", "host"] if accel == "kvm" else []

    def kvm_capable(self, cpuinfo: str) -> str | None:
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.M):
            return "the CPU shows no vmx/svm flag: no hardware virtualisation for guests"
        return None

    def boot_kernel(self, raw: bytes, progress: Callable[[str], None]) -> tuple[str, bytes, bool]:
        from pytest_microvm.errors import ImageError
        from pytest_microvm.image.kernel import extract_vmlinux, has_pvh_entry, is_elf

        if is_elf(raw):
            return "vmlinux", raw, has_pvh_entry(raw)
        progress("extracting the uncompressed vmlinux (PVH boot skips the in-guest decompression)")
        try:
            data = extract_vmlinux(raw)
        except ImageError as exc:
            progress(f"cannot extract vmlinux ({exc}); the image boots the bzImage, which is slower")
            return "bzImage", raw, False
        if has_pvh_entry(data):
            return "vmlinux", data, True
        return "bzImage", raw, False

    def identity_devices(self, guid: str) -> list[str]:
        return ["-device", f"vmgenid,id={VMGENID_ID},guid={guid}"]


class Aarch64(Arch):
    name = "aarch64"
    debian = "arm64"
    qemu_binary = "qemu-system-aarch64"
    qemu_package = "qemu-system-arm"
    kernel_package = "linux-image-arm64"
    console = "ttyAMA0"
    elf_machine = 183  # EM_AARCH64
    cross_compilers = ("aarch64-linux-gnu-gcc",)
    linux_arch = "arm64"
    kernel_target = "Image"
    kernel_output = "arch/arm64/boot/Image"
    cross_packages = "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    hotplug = "PCIEPORTBUS and HOTPLUG_PCI_PCIE (Debian's arm64 kernel has them)"
    TCG_CPU = "cortex-a57"

    def machine(self, accel: str) -> str:
        # GICv3 under TCG: v2 stops at 8 vCPUs. Under KVM the host's own version.
        return f"virt,accel={accel},gic-version={'host' if accel == 'kvm' else '3'}"

    def cpu(self, accel: str) -> list[str]:
        return ["-cpu", "host" if accel == "kvm" else self.TCG_CPU]

    def kvm_capable(self, cpuinfo: str) -> str | None:
        return None  # arm64 has no cpuinfo flag for it: a usable /dev/kvm is the answer

    def boot_kernel(self, raw: bytes, progress: Callable[[str], None]) -> tuple[str, bytes, bool]:
        import gzip
        import zlib

        from pytest_microvm.errors import ImageError

        if raw[:2] == b"\x1f\x8b":  # a gzipped Image (some distributions' vmlinuz)
            progress("unpacking the gzipped kernel Image")
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:
                raise ImageError(f"unpacking the gzipped arm64 kernel failed: {exc}") from exc
        if raw[0x38:0x3C] != b"ARM\x64":
            raise ImageError("not an arm64 kernel Image (no ARM\\x64 magic at offset 0x38)")
        return "Image", raw, False

    def identity_devices(self, guid: str) -> list[str]:
        # vmgenid reaches a guest only through ACPI, which a -kernel boot of virt does not have.
        return []


ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64(), Aarch64())}
NAMES = tuple(ARCHES)


def host_name() -> str:
    """The host's architecture as `uname -m` says it (arm64 hosts: aarch64)."""
    machine = os.uname().machine
    return _ALIASES.get(machine.lower(), machine)


def get(name: str | None = None) -> Arch:
    """The architecture called ``name`` (also Debian's names), or the host's for None or "".

    A ConfigError for one this project does not run, listing those it does.
    """
    from pytest_microvm.errors import ConfigError

    wanted = host_name() if not name else _ALIASES.get(name.lower(), name.lower())
    arch = ARCHES.get(wanted)
    if arch is None:
        supported = ", ".join(f"{a.name} ({a.qemu_package})" for a in ARCHES.values())
        what = f"arch={name!r}" if name else f"this host's architecture {wanted!r}"
        raise ConfigError(f"{what} is not supported; supported guests (and the package with their QEMU): {supported}")
    return arch


def missing_qemu(arch: Arch) -> str | None:
    """What to install for ``arch``'s QEMU, or None when it is on PATH."""
    if shutil.which(arch.qemu_binary):
        return None
    return f"{arch.qemu_binary} is not installed (Debian/Ubuntu: apt-get install {arch.qemu_package})"
