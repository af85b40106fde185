"""A clone's guest RAM: the template's pages, copied or mapped copy-on-write.

Which one is the vsock channel's call (``Channel.shared_memory``), chosen in
:func:`clone_ram`:

- :class:`CopiedRam` (a process of ours maps guest RAM: the userspace vsock backend). The
  backend must see what the guest writes, so RAM is shared, and a shared mapping of the
  template's file would write into it: the clone gets a copy of what the template guest
  touched (only its data extents; the holes read as the zeros the guest never wrote), in
  a memfd (or an O_TMPFILE on ``$MICROVM_SHM_DIR``): nameless, so nothing is left behind
  whatever happens to this process.
- :class:`MappedRam` (nothing outside QEMU maps it: the kernel path, where vhost works
  through QEMU's own mappings). QEMU maps the template's file private
  (``memory-backend-file,share=off``): the clone reads the template's pages from the page
  cache and owns only those it writes. QEMU 7.2 loads a state saved with
  ``x-ignore-shared`` into such a mapping (checked on this project's machines: the guest
  carried on, the file stayed byte-identical). Its ``readonly=on`` cannot be used to
  guard the file: in 7.2 it makes guest RAM read-only to the guest too. So what keeps the
  file intact is that no clone discards pages (QEMU punches holes in a file-backed RAM
  block on discard, private mapping or not): a clone has no balloon and no virtio-mem.
"""

from __future__ import annotations

import errno
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from pytest_microvm import _proc, _wait
from pytest_microvm.machine.snapshot.errors import CannotClone, ShmTooSmall, SnapshotError
from pytest_microvm.machine.snapshot.store import Template

SHM_ENV = "MICROVM_SHM_DIR"  # a tmpfs for copied clone RAM instead of a memfd (checked for room)


class CloneRam(ABC):
    """One clone's RAM: a file QEMU maps, given to it by descriptor (``/proc/self/fd/N``),
    so that the clone holds exactly the making of the template it opened."""

    path: str  # for QEMU's mem-path
    shared: bool  # share=on (a copy) or share=off (copy-on-write of the template's file)
    pass_fds: tuple[int, ...]

    @abstractmethod
    def ready(self) -> None:
        """Return once the RAM holds the template's pages (before the state loads);
        SnapshotError if it cannot."""

    @abstractmethod
    def close(self) -> None:
        """Close our descriptors (QEMU has its own); safe to call twice."""


def clone_ram(template: Template, *, shared: bool, name: str = "clone") -> CloneRam:
    """The RAM for a clone of ``template``: a copy when it must be ``shared`` with a
    process of ours, else the template's own file mapped copy-on-write."""
    return CopiedRam(template, name) if shared else MappedRam(template)


class MappedRam(CloneRam):
    """The template's RAM file, mapped private by QEMU: nothing is copied up front."""

    shared = False

    def __init__(self, template: Template) -> None:
        try:
            # Read-only here; QEMU opens it again through /proc/self/fd for its private mapping.
            self._fd: int | None = os.open(template.ram, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot template {template.key}'s RAM ({exc})") from exc
        self.path = f"/proc/self/fd/{self._fd}"
        self.pass_fds = (self._fd,)

    def ready(self) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CopiedRam(CloneRam):
    """A nameless copy of the template's touched pages, filled by a thread while QEMU starts
    (QEMU maps the file at once but reads none of it before the state loads)."""

    shared = True

    def __init__(self, template: Template, name: str = "clone") -> None:
        dst, src = ram_file(template)
        self._fd: int | None = dst
        self.path = f"/proc/self/fd/{dst}"
        self.pass_fds = (dst,)
        self._error: BaseException | None = None
        self._filling: threading.Thread | None = threading.Thread(
            target=self._fill, args=(src, dst), name=f"{name}-ram", daemon=True
        )
        self._filling.start()

    def _fill(self, src: int, dst: int) -> None:
        try:
            copy_extents(src, dst, os.fstat(src).st_size)
        except BaseException as exc:  # handed to the starting thread in ready()
            self._error = exc
        finally:
            os.close(src)

    def ready(self) -> None:
        self._join()
        if self._error is not None:
            raise SnapshotError(f"copying the template's RAM failed: {self._error}")

    def _join(self) -> None:
        if self._filling is not None:
            _wait.join(self._filling)
            self._filling = None

    def close(self) -> None:
        self._join()  # a start that failed before the restore: the copy still runs
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def ram_file(template: Template) -> tuple[int, int]:
    """(a nameless file for a clone's RAM, sized but not filled; the template's RAM file,
    open for reading): :func:`copy_extents` fills the one from the other.

    A memfd, like a boot's RAM: it never has a name, so nothing is left behind whatever
    happens to this process, and it lives as long as a descriptor or mapping of it
    (QEMU's, the vsock backend's). ``$MICROVM_SHM_DIR`` puts it on that tmpfs instead
    (O_TMPFILE: nameless too), checked for room first.
    """
    where = os.environ.get(SHM_ENV)
    try:
        dst = _tmpfile(Path(where), template.memory_mib) if where else os.memfd_create("clone-ram", os.MFD_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot make a file for clone RAM ({exc})") from exc
    try:
        src = os.open(template.ram, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(dst)
        raise SnapshotError(f"cannot read snapshot template {template.key}'s RAM ({exc})") from exc
    try:
        os.ftruncate(dst, os.fstat(src).st_size)
    except BaseException as exc:
        os.close(dst)
        os.close(src)
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot size the file for clone RAM ({exc})") from exc
        raise
    return dst, src


def _tmpfile(where: Path, memory_mib: int) -> int:
    try:
        st = os.statvfs(where)
    except OSError as exc:
        raise CannotClone(f"cannot use {where} for clone RAM ({exc}): fix or unset {SHM_ENV}") from exc
    free = st.f_bavail * st.f_frsize
    if free < memory_mib << 20:
        raise ShmTooSmall(
            f"{where} has {free >> 20} MiB free, a clone needs {memory_mib} MiB "
            f"(its guest memory): enlarge it (mount -o remount,size=... {where}) or unset {SHM_ENV}"
        )
    try:
        return os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CannotClone(
            f"cannot make an unnamed file (O_TMPFILE) in {where} for clone RAM ({exc}): fix or unset {SHM_ENV}"
        ) from exc


def copy_extents(src: int, dst: int, size: int) -> None:
    """Copy ``src``'s data extents into ``dst`` (``size`` bytes); holes stay holes."""
    os.ftruncate(dst, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        left = end - start
        offset = start
        while left:
            sent = os.sendfile(dst, src, offset, min(left, 1 << 30))
            if sent == 0:
                raise SnapshotError("the template's RAM file is shorter than it says")
            offset += sent
            left -= sent
        pos = end


_PAGE = 4096
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_zero_pages(path: Path) -> int:
    """Make every page of zeros in the template's RAM file a hole; the bytes punched.

    Done once, while the template is made (before anything maps it for a clone): a hole
    reads as the same zeros, and a clone's copy skips holes, so pages the template guest
    freed (zeroed as it freed them, ``init_on_free=1``) cost clones nothing.
    """
    import ctypes
    import mmap

    libc = _proc.load_libc()
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    zero_block, zero_page = bytes(1 << 21), bytes(_PAGE)
    punched = 0
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0
        with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as view:

            def punch(start: int, end: int) -> None:
                nonlocal punched
                if end > start:
                    if libc.fallocate(f.fileno(), _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start):
                        err = ctypes.get_errno()
                        raise OSError(err, f"fallocate(PUNCH_HOLE) on {path}: {os.strerror(err)}")
                    punched += end - start

            pos = 0
            while pos < size:
                try:
                    start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break
                    raise
                end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
                run = start  # the first page of the current run of zero pages
                page = start
                while page < end:
                    step = min(len(zero_block), end - page)
                    if step == len(zero_block) and view[page : page + step] == zero_block:
                        page += step
                        continue
                    stop = page + step
                    while page < stop:
                        if view[page : page + _PAGE] != zero_page:
                            punch(run, page)
                            run = page + _PAGE
                        page += _PAGE
                punch(run, end)
                pos = end
    return punched
