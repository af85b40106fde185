"""Image builder pieces on synthetic inputs: cpio layout, vmlinux extraction, module order."""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from pathlib import Path

import pytest

from pytest_microvm import ImageError
from pytest_microvm.image.cpio import CpioWriter
from pytest_microvm.image.kernel import extract_vmlinux, has_pvh_entry, module_depends, resolve_modules
from tests.elf_samples import bzimage, elf64, note


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Parse newc back: name -> (mode, data, (rdevmajor, rdevminor))."""
    entries = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries[name] = (mode, data[pos : pos + size], (f[9], f[10]))
        pos += size
        pos += -pos % 4


def test_cpio_entries_round_trip() -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    w.directory("bin")
    w.file("bin/tool", b"\x7fELF...", 0o755)
    w.symlink("bin/sh", "/bin/busybox")
    w.char_device("dev/console", 5, 1)
    w.file("odd", b"abc")  # a size that needs padding
    w.close()
    entries = read_cpio(out.getvalue())
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/tool"] == (stat.S_IFREG | 0o755, b"\x7fELF...", (0, 0))
    assert entries["bin/sh"][1] == b"/bin/busybox" and stat.S_ISLNK(entries["bin/sh"][0])
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["odd"][1] == b"abc"


def test_cpio_is_deterministic_and_refuses_duplicates() -> None:
    def build() -> bytes:
        out = io.BytesIO()
        w = CpioWriter(out)
        w.file("a", b"1")
        w.close()
        return out.getvalue()

    assert build() == build()
    w = CpioWriter(io.BytesIO())
    w.file("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        w.file("/a", b"2")


PVH_ELF = elf64(notes=note(b"Xen", 18, b"\0" * 4))


def test_pvh_note_detection() -> None:
    assert has_pvh_entry(PVH_ELF)
    assert not has_pvh_entry(elf64(notes=note(b"GNU", 3, b"\0" * 20)))
    assert not has_pvh_entry(elf64(notes=note(b"Xen", 5, b"\0" * 4)))
    assert not has_pvh_entry(b"not an elf")


@pytest.mark.parametrize(
    "compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress], ids=["xz", "gzip"]
)
def test_extract_vmlinux(compress: object) -> None:
    # The kernel appends its size after the compressed stream; extraction must ignore it.
    image = bzimage(compress(PVH_ELF) + b"\x10\x20\x00\x00", setup_sects=3)  # type: ignore[operator]
    assert extract_vmlinux(image) == PVH_ELF


def test_extract_vmlinux_errors_say_why() -> None:
    with pytest.raises(ImageError, match="not a bzImage"):
        extract_vmlinux(b"\0" * 4096)
    with pytest.raises(ImageError, match="zstd"):
        extract_vmlinux(bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 64))
    with pytest.raises(ImageError, match="not an ELF"):
        extract_vmlinux(bzimage(lzma.compress(b"plain data")))
    with pytest.raises(ImageError, match="xz"):
        extract_vmlinux(bzimage(b"\xfd7zXZ\x00garbage"))


def ko(depends: str) -> bytes:
    return elf64(sections={".modinfo": f"license=GPL\0depends={depends}\0vermagic=6.1\0".encode()})


def test_module_depends_reads_modinfo() -> None:
    assert module_depends(ko("virtio,virtio_ring")) == ["virtio", "virtio_ring"]
    assert module_depends(ko("")) == []


def test_resolve_modules_orders_dependencies_first(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel" / "drivers"
    kernel.mkdir(parents=True)
    (kernel / "virtio_ring.ko").write_bytes(ko(""))
    (kernel / "virtio.ko").write_bytes(ko("virtio_ring"))
    (kernel / "vsock.ko").write_bytes(ko(""))
    (kernel / "vmw_vsock_virtio_transport.ko.xz").write_bytes(lzma.compress(ko("virtio,vsock,virtio_ring")))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    order = [p.name for p in resolve_modules(tmp_path, ["vmw_vsock_virtio_transport", "virtio_mmio"])]
    assert order == ["virtio_ring.ko", "virtio.ko", "vsock.ko", "vmw_vsock_virtio_transport.ko.xz"]
    with pytest.raises(ImageError, match="no_such_mod is neither"):
        resolve_modules(tmp_path, ["no_such_mod"])


def test_kernel_cache_entry_follows_the_module_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_microvm.image import sources

    moddir = tmp_path / "lib" / "modules" / "6.1-test"
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "kernel" / "virtio_ring.ko").write_bytes(ko(""))
    (moddir / "kernel" / "virtio.ko").write_bytes(ko("virtio_ring"))
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(PVH_ELF)
    cache = tmp_path / "cache"
    monkeypatch.setattr(sources, "GUEST_MODULES", ("virtio_ring",))
    one = sources.user_kernel(kernel, moddir, cache, lambda _m: None)
    monkeypatch.setattr(sources, "GUEST_MODULES", ("virtio_ring", "virtio"))
    two = sources.user_kernel(kernel, moddir, cache, lambda _m: None)
    assert [p.name for p in one.modules] == ["virtio_ring.ko"]
    assert [p.name for p in two.modules] == ["virtio_ring.ko", "virtio.ko"]
    assert one.identity != two.identity
