"""Kernel handling: the uncompressed vmlinux for PVH boot, and kernel modules in load order.

Why vmlinux: under TCG, decompressing a bzImage's XZ payload costs about 3 s of a 5 s
boot (Debian's 6.1 kernel, QEMU 7.2, from QEMU's start to poweroff: 5.7 s with the
bzImage on ``-M pc``, 2.5 s with the vmlinux it carries). QEMU boots an ELF vmlinux
directly through its PVH entry point when the kernel has one (CONFIG_PVH, a Xen ELF
note), so the builder extracts it once.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable
from pathlib import Path

from pytest_microvm.errors import ImageError

_XEN_ELFNOTE_PHYS32_ENTRY = 18

# What the guest needs for a virtio vsock device on PCI or MMIO transports, plus
# virtio-console (virtio-serial ports: the benchmark's reference channel) and virtio-net
# (the user-mode network), in load order; each module's own dependencies are added
# before it.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "virtio_net",  # for VMConfig(network=True); without a NIC it only registers a driver
)

# Modules only some boots need, loaded by the agent when the kernel command line asks
# for the group (``microvm.modules=blk,overlay``): a busybox guest does not pay for a
# root disk's drivers. Each group's own dependencies come with it.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    # The root filesystem image on a virtio-blk disk. EROFS needs libcrc32c, whose init
    # asks the crypto API for "crc32c" and fails with ENOENT unless an implementation is
    # loaded first (a soft dependency: nothing in .modinfo's depends= says so).
    "blk": ("virtio_blk", "crc32c_generic", "erofs"),
    "9p": ("9pnet_virtio", "9p"),  # host directory shares, and the host's / as the root
    "overlay": ("overlay",),  # the tmpfs overlay on top of a read-only root
    # /dev/vhost-vsock in the guest, for VMs of its own (the nested CI stage, scripts/nested)
    "vhost": ("vhost_iotlb", "vhost", "vhost_vsock"),
}

_DECOMPRESSORS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def has_pvh_entry(elf: bytes) -> bool:
    """True if a 64-bit ELF kernel carries the PVH entry note QEMU needs to boot it directly."""
    if not is_elf(elf) or elf[4] != 2:
        return False
    (e_phoff,) = struct.unpack_from("<Q", elf, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", elf, e_phoff + i * e_phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF kernel inside a bzImage, or raise ImageError saying why not."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ImageError(f"boot protocol {version:#x} is too old to locate the payload (need 2.08)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    kind = next((name for magic, name in _DECOMPRESSORS if payload.startswith(magic)), None)
    try:
        if kind == "xz":
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif kind == "lzma":
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        elif kind == "gzip":
            # A streaming decompressor: it stops at the end of the stream and ignores
            # whatever the kernel build appended after it.
            elf = zlib.decompressobj(wbits=31).decompress(payload)
        elif kind == "bzip2":
            elf = bz2.BZ2Decompressor().decompress(payload)
        else:
            raise ImageError(f"the kernel payload is {kind or 'in an unknown format'}, which Python cannot unpack")
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
        raise ImageError(f"unpacking the {kind} kernel payload failed: {exc}") from exc
    if not is_elf(elf):
        raise ImageError("the unpacked kernel payload is not an ELF file")
    return elf


def read_module(path: Path) -> bytes:
    """A module's bytes, uncompressed (finit_module in the guest gets a plain .ko)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":  # Ubuntu's since 23.10; Python has no zstd before 3.14
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(f"{path.name} is zstd-compressed and no `zstd` tool is installed: apt-get install zstd")
        proc = subprocess.run([zstd, "-dcq", "--", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise ImageError(f"zstd -d {path.name} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    return data


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's ``.modinfo`` ELF section.

    Read from the module itself because a kernel .deb ships no modules.dep (depmod
    writes it at install time).
    """
    if not is_elf(ko) or ko[4] != 2:
        raise ImageError("not a 64-bit ELF kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[str_off + name : str_off + name + 9] == b".modinfo\0":
            for field in ko[offset : offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    return [d for d in field[8:].decode().split(",") if d]
            return []
    return []


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first.

    Built-in modules (listed in modules.builtin) are skipped; a module that is neither
    present nor built in is an ImageError naming it.
    """
    if not (moddir / "kernel").is_dir():
        raise ImageError(f"{moddir} has no kernel/ directory: not a lib/modules/<release> tree")
    paths = {_module_name(str(p)): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = {_module_name(x) for x in builtin_file.read_text().split()} if builtin_file.exists() else set()

    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in paths:
            if name in builtin:
                return
            raise ImageError(f"kernel module {name} is neither in {moddir} nor built in")
        for dep in module_depends(read_module(paths[name])):
            visit(dep.replace("-", "_"))
        order.append(paths[name])

    for name in wanted:
        visit(name.replace("-", "_"))
    return order
