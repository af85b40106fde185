"""Guest RAM as QEMU shares it: the memory table mapped with mmap, and address translation.

Two address spaces reach us: ring addresses are QEMU *virtual* addresses (``uva``);
descriptor addresses are guest *physical* addresses (``gpa``). Both are translated to
(mmap, offset) pairs here, with bounds checked: a buffer the guest points outside its
RAM, or across a region boundary, is a :class:`BadAddress`, never a crash.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass

from pytest_microvm.channel.vhost_user.messages import MemRegion


class BadAddress(Exception):
    """A guest address (or range) outside the shared memory."""


@dataclass
class _Mapped:
    region: MemRegion
    mm: mmap.mmap

    def contains_gpa(self, gpa: int, length: int) -> bool:
        r = self.region
        return r.gpa <= gpa and gpa + length <= r.gpa + r.size

    def contains_uva(self, uva: int, length: int) -> bool:
        r = self.region
        return r.uva <= uva and uva + length <= r.uva + r.size


class GuestMemory:
    """The current memory table. Replaced wholesale on every SET_MEM_TABLE."""

    def __init__(self) -> None:
        self._maps: list[_Mapped] = []
        self._last: tuple[int, int, mmap.mmap, int] | None = None  # start, end, mapping, gpa - offset

    def set_table(self, regions: list[MemRegion], fds: tuple[int, ...]) -> None:
        """Map the regions (one fd each, closed here) and drop the previous mapping."""
        if len(fds) != len(regions):
            for fd in fds:
                os.close(fd)
            raise BadAddress(f"memory table has {len(regions)} regions but {len(fds)} fds")
        new: list[_Mapped] = []
        try:
            for region, fd in zip(regions, fds, strict=True):
                # Map from file offset 0 and index with mmap_offset, as libvhost-user does.
                new.append(_Mapped(region, mmap.mmap(fd, region.size + region.mmap_offset, mmap.MAP_SHARED)))
        finally:
            for fd in fds:
                os.close(fd)
        self.close()
        self._maps = new

    def close(self) -> None:
        for m in self._maps:
            # A view still exported (a ring being torn down) keeps the mapping alive until
            # it is released; the GC closes it then.
            with contextlib.suppress(BufferError):
                m.mm.close()
        self._maps = []
        self._last = None

    @property
    def mapped(self) -> bool:
        return bool(self._maps)

    def gpa(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) of a guest-physical range."""
        # Hot path (every descriptor): try the region that answered last time first.
        last = self._last
        if last is not None and last[0] <= gpa and gpa + length <= last[1]:
            return last[2], gpa - last[3]
        for m in self._maps:
            if m.contains_gpa(gpa, length):
                r = m.region
                self._last = (r.gpa, r.gpa + r.size, m.mm, r.gpa - r.mmap_offset)
                return m.mm, r.mmap_offset + gpa - r.gpa
        raise BadAddress(f"guest address {gpa:#x}+{length:#x} is outside guest memory")

    def uva(self, uva: int, length: int) -> tuple[mmap.mmap, int]:
        """(mapping, offset) of a range given as a QEMU virtual address."""
        for m in self._maps:
            if m.contains_uva(uva, length):
                return m.mm, m.region.mmap_offset + uva - m.region.uva
        raise BadAddress(f"QEMU address {uva:#x}+{length:#x} is outside the memory table")
