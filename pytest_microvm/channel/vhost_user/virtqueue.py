"""Split virtqueues (virtio 1.2 §2.7) over the shared guest memory.

The backend is the device side: it pops descriptor chains the driver made available,
and pushes them to the used ring with the number of bytes written. Every index and
address comes from the guest and is checked: a bad chain becomes a
:class:`Chain` with ``error`` set, returned to the guest unused, never a crash.
"""

from __future__ import annotations

import mmap
import os
import struct

from pytest_microvm.channel.vhost_user.memory import BadAddress, GuestMemory
from pytest_microvm.channel.vhost_user.messages import VringAddr

DESC = struct.Struct("<QIHH")  # addr (GPA), len, flags, next
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

Segment = tuple[mmap.mmap, int, int]  # mapping, offset, length


class Chain:
    """One descriptor chain: the guest's readable and writable buffers, in order.

    A plain slotted class, not a dataclass: one is made per packet on the hot path.
    """

    __slots__ = ("error", "head", "readable", "readable_len", "writable", "writable_len")

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[Segment] = []
        self.writable: list[Segment] = []
        self.readable_len = 0
        self.writable_len = 0
        self.error: str | None = None

    def read(self) -> bytes:
        return b"".join(mm[off : off + n] for mm, off, n in self.readable)

    def write(self, data: bytes | memoryview, skip: int = 0) -> int:
        """Scatter ``data`` into the writable buffers after ``skip`` bytes; return bytes written."""
        view = memoryview(data)
        written = 0
        for mm, off, n in self.writable:
            if skip >= n:
                skip -= n
                continue
            take = min(n - skip, len(view) - written)
            mm[off + skip : off + skip + take] = view[written : written + take]
            written += take
            skip = 0
            if written == len(view):
                break
        return written


class Virtqueue:
    """Device-side state of one vring, set up piece by piece by vhost-user messages."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.addr: VringAddr | None = None
        self.kick_fd = -1
        self.call_fd = -1
        self.enabled = False
        self.last_avail = 0  # next avail ring slot we will read (free-running u16)
        self.used_idx = 0  # next used ring slot we will write (free-running u16)
        self._desc: tuple[mmap.mmap, int] | None = None
        self._avail: tuple[mmap.mmap, int] | None = None
        self._used: tuple[mmap.mmap, int] | None = None
        self._pending_notify = False

    @property
    def ready(self) -> bool:
        """A ring is live once it has addresses, a kick fd and ENABLE=1 (QEMU 7.2 order)."""
        return self.enabled and self.kick_fd >= 0 and self._desc is not None

    def map(self, mem: GuestMemory) -> None:
        """Translate the ring addresses through the current memory table."""
        if self.addr is None or not self.size or not mem.mapped:
            self._desc = self._avail = self._used = None
            return
        n = self.size
        self._desc = mem.uva(self.addr.desc, 16 * n)
        self._avail = mem.uva(self.addr.avail, 6 + 2 * n)
        self._used = mem.uva(self.addr.used, 6 + 8 * n)
        # After a reset the driver zeroed the used ring: start from what is in memory,
        # not from our stale counter (libvhost-user does the same).
        mm, off = self._used
        self.used_idx = U16.unpack_from(mm, off + 2)[0]

    def set_fd(self, which: str, fd: int) -> None:
        old = getattr(self, which)
        if old >= 0:
            os.close(old)
        setattr(self, which, fd)

    def stop(self) -> None:
        """GET_VRING_BASE: stop processing and drop the eventfds; keep last_avail."""
        self.enabled = False
        self.set_fd("kick_fd", -1)
        self.set_fd("call_fd", -1)

    def reset(self) -> None:
        self.stop()
        self.addr = None
        self._desc = self._avail = self._used = None

    # ---- the ring -----------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        mm, off = self._avail
        return int(U16.unpack_from(mm, off + 2)[0])

    def has_avail(self) -> bool:
        return self.ready and self.avail_idx() != self.last_avail

    def pop(self, mem: GuestMemory) -> Chain | None:
        """The next available chain, or None. A malformed chain comes back with ``error``."""
        if not self.ready or self.avail_idx() == self.last_avail:
            return None
        assert self._avail is not None and self._desc is not None
        amm, aoff = self._avail
        head = int(U16.unpack_from(amm, aoff + 4 + 2 * (self.last_avail % self.size))[0])
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = Chain(head)
        if head >= self.size:
            chain.error = f"head index {head} outside a queue of {self.size}"
            chain.head = 0  # still must be returned; 0 is the only safe index to name
            return chain
        dmm, doff = self._desc
        idx = head
        for _ in range(self.size):  # a chain longer than the queue is a loop
            addr, length, flags, nxt = DESC.unpack_from(dmm, doff + 16 * idx)
            if flags & DESC_F_INDIRECT:
                chain.error = "indirect descriptor (not negotiated)"
                return chain
            if length:
                try:
                    mm, off = mem.gpa(addr, length)
                except BadAddress as exc:
                    chain.error = str(exc)
                    return chain
                if flags & DESC_F_WRITE:
                    chain.writable.append((mm, off, length))
                    chain.writable_len += length
                else:
                    chain.readable.append((mm, off, length))
                    chain.readable_len += length
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= self.size:
                chain.error = f"next index {nxt} outside a queue of {self.size}"
                return chain
            idx = nxt
        chain.error = "descriptor chain loops"
        return chain

    def push(self, head: int, length: int) -> None:
        """Return a chain to the driver with ``length`` bytes written into it."""
        assert self._used is not None
        mm, off = self._used
        USED_ELEM.pack_into(mm, off + 4 + 8 * (self.used_idx % self.size), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(mm, off + 2, self.used_idx)  # after the element: the driver reads idx first
        self._pending_notify = True

    def suppress_kicks(self, on: bool) -> None:
        """Ask the driver not to kick while we are draining anyway (virtio 1.2 §2.7.10).

        Kicks cost the guest an exit each; while the device is busy it will look at the
        ring again without being told. After turning kicks back on, the caller must
        look once more: a buffer made available just before is otherwise missed.
        """
        if self._used is not None:
            mm, off = self._used
            U16.pack_into(mm, off, USED_F_NO_NOTIFY if on else 0)

    def notify(self) -> None:
        """Signal the driver once for everything pushed since the last call, unless it said not to."""
        if not self._pending_notify or self.call_fd < 0 or self._avail is None:
            return
        self._pending_notify = False
        mm, off = self._avail
        if not U16.unpack_from(mm, off)[0] & AVAIL_F_NO_INTERRUPT:
            os.eventfd_write(self.call_fd, 1)
