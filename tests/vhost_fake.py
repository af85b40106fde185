"""Fakes for testing the vhost-user vsock backend without a VM: guest memory, a ring driver,
and a QEMU that speaks vhost-user over a socketpair. These are test doubles, not QEMU.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pytest_microvm.channel.vhost_user import messages as m
from pytest_microvm.channel.vhost_user.backend import Backend
from pytest_microvm.channel.vhost_user.vsock import HDR, HDR_SIZE, Header, Muxer, Op

UVA_BASE = 0x7F00_0000_0000


class FakeGuestMemory:
    """A memfd laid out as two regions with a hole, so gpa != file offset in the second:
    [gpa 0, 0xa0000) at file 0 and [gpa 0x100000, size) at file 0xa0000."""

    HOLE = 0x100000 - 0xA0000

    def __init__(self, size: int = 8 << 20) -> None:
        self.size = size
        self.fd = os.memfd_create("fake-guest-ram")
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.regions = [
            m.MemRegion(gpa=0, size=0xA0000, uva=UVA_BASE, mmap_offset=0),
            m.MemRegion(gpa=0x100000, size=size - 0xA0000, uva=UVA_BASE + 0xA0000, mmap_offset=0xA0000),
        ]
        self._next = 0x100000  # allocator for rings and buffers, in the second region

    def offset(self, gpa: int) -> int:
        return gpa if gpa < 0xA0000 else gpa - self.HOLE

    def uva(self, gpa: int) -> int:
        return UVA_BASE + self.offset(gpa)

    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) // align * align
        self._next = gpa + n
        assert self.offset(self._next) <= self.size
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = self.offset(gpa)
        self.mm[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = self.offset(gpa)
        return self.mm[off : off + n]

    def table(self) -> tuple[bytes, list[int]]:
        payload = struct.pack("<II", len(self.regions), 0) + b"".join(
            struct.pack("<QQQQ", r.gpa, r.size, r.uva, r.mmap_offset) for r in self.regions
        )
        return payload, [os.dup(self.fd) for _ in self.regions]

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class FakeDriver:
    """The guest side of one split virtqueue: makes chains available, reads the used ring."""

    def __init__(self, mem: FakeGuestMemory, size: int = 16) -> None:
        self.mem = mem
        self.size = size
        self.desc = mem.alloc(16 * size, 4096)
        self.avail = mem.alloc(6 + 2 * size, 2)
        self.used = mem.alloc(6 + 8 * size, 4)
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}

    def reset(self) -> None:
        """What a driver reset does: rings emptied, indexes from 0, every descriptor free."""
        self.mem.write(self.desc, b"\0" * (16 * self.size))
        self.mem.write(self.avail, b"\0" * (6 + 2 * self.size))
        self.mem.write(self.used, b"\0" * (6 + 8 * self.size))
        self.avail_idx = self.used_seen = 0
        self.free = list(range(self.size))
        self.chains = {}

    def start_at(self, idx: int) -> None:
        """Begin both indexes at ``idx`` (to test u16 wraparound)."""
        self.avail_idx = self.used_seen = idx
        self.mem.write(self.avail + 2, struct.pack("<H", idx))
        self.mem.write(self.used + 2, struct.pack("<H", idx))

    def addr_payload(self, index: int) -> bytes:
        return struct.pack(
            "<IIQQQQ", index, 0, self.mem.uva(self.desc), self.mem.uva(self.used), self.mem.uva(self.avail), 0
        )

    def add(self, bufs: list[tuple[int, int, bool]], *, raw_flags: dict[int, int] | None = None) -> int:
        """Make a chain of (gpa, len, device-writable) available; returns its head.

        Like a real driver, waits for the device to return descriptors when none are free.
        """
        deadline = time.monotonic() + 5
        while len(self.free) < len(bufs):
            assert time.monotonic() < deadline, "the device never returned descriptors"
            self.take_used()
            time.sleep(0.001)
        ids = [self.free.pop(0) for _ in bufs]
        for i, (gpa, length, writable) in enumerate(bufs):
            flags = (1 if i + 1 < len(bufs) else 0) | (2 if writable else 0)
            if raw_flags and i in raw_flags:
                flags = raw_flags[i]
            nxt = ids[i + 1] if i + 1 < len(bufs) else 0
            self.mem.write(self.desc + 16 * ids[i], struct.pack("<QIHH", gpa, length, flags, nxt))
        self.chains[ids[0]] = ids
        self.publish(ids[0])
        return ids[0]

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def take_used(self) -> list[tuple[int, int]]:
        (idx,) = struct.unpack("<H", self.mem.read(self.used + 2, 2))
        out = []
        while self.used_seen != idx:
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (self.used_seen % self.size), 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        for head, _ in out:
            self.free.extend(self.chains.pop(head, [head]))
        return out

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write(self.avail, struct.pack("<H", 1 if on else 0))


@dataclass
class Packet:
    hdr: Header
    payload: bytes


class FakeQemu:
    """Plays QEMU on the control socket and the guest driver on the two rings.

    By default the backend runs in this process, on a thread, over a socketpair; with
    ``control`` (the listening socket path of a backend process, e.g. one the fork server
    forked, serving ``<workdir>/vsock``) it connects there as QEMU would.
    """

    RX_BUF = 4096

    def __init__(self, workdir: Path, guest_cid: int = 3, *, control: Path | None = None) -> None:
        self.guest_cid = guest_cid
        self.uds = str(workdir / "vsock")
        self.listener: socket.socket | None = None
        self.backend: Backend | None = None
        if control is None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.uds)
            self.listener.listen(16)
            self.listener.setblocking(False)
            self.qemu_end, backend_end = socket.socketpair()
            self._muxer: Muxer | None = Muxer(guest_cid, self.uds, self.listener)
            self.backend = Backend(backend_end, self._muxer)
        else:
            self._muxer = None
            self.qemu_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.qemu_end.connect(str(control))
        self.mem = FakeGuestMemory()
        self.rx = FakeDriver(self.mem)
        self.tx = FakeDriver(self.mem)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self._thread: threading.Thread | None = None
        self.guest_port = 40000
        self.host_sockets: list[socket.socket] = []

    @property
    def muxer(self) -> Muxer:
        assert self._muxer is not None, "the backend runs in another process"
        return self._muxer

    def host_listener(self, port: int) -> socket.socket:
        """A host program listening for guest connections to ``port`` (closed by stop())."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"{self.uds}_{port}")
        sock.listen(4)
        self.host_sockets.append(sock)
        return sock

    # ---- vhost-user ------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1) -> None:
        data = m.encode(request, payload, flags)
        if fds:
            socket.send_fds(self.qemu_end, [data], fds)
            for fd in fds:
                if fd not in self.kick and fd not in self.call:
                    os.close(fd)
        else:
            self.qemu_end.sendall(data)

    def recv_reply(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        self.qemu_end.settimeout(timeout)
        hdr = self.qemu_end.recv(12, socket.MSG_WAITALL)
        request, flags, size = m.HEADER.unpack(hdr)
        return request, flags, self.qemu_end.recv(size, socket.MSG_WAITALL) if size else b""

    def setup(self, *, rx_start: int = 0, tx_start: int = 0) -> None:
        """The DRIVER_OK sequence QEMU 7.2 sends (see the recorded traces), then start the loop."""
        self.send(m.Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", m.PROTOCOL_FEATURES))
        self.send(m.Request.SET_FEATURES, struct.pack("<Q", m.FEATURES))
        payload, fds = self.mem.table()
        self.send(m.Request.SET_MEM_TABLE, payload, fds)
        for i, drv, start in ((0, self.rx, rx_start), (1, self.tx, tx_start)):
            drv.start_at(start)
            self.send(m.Request.SET_VRING_NUM, struct.pack("<II", i, drv.size))
            self.send(m.Request.SET_VRING_BASE, struct.pack("<II", i, start))
            self.send(m.Request.SET_VRING_ADDR, drv.addr_payload(i))
            self.send(m.Request.SET_VRING_KICK, struct.pack("<Q", i), [self.kick[i]])
            self.send(m.Request.SET_VRING_CALL, struct.pack("<Q", i), [self.call[i]])
        for i in range(2):
            self.send(m.Request.SET_VRING_ENABLE, struct.pack("<II", i, 1))
        if self.backend is None:
            # A request with a reply: the backend handles messages in order, so once it
            # answers, the rings are live.
            self.send(m.Request.GET_FEATURES)
            self.recv_reply()
            return
        self._thread = threading.Thread(target=self.backend.serve, daemon=True)
        self._thread.start()
        # The backend handles the messages on its own thread: wait until the rings are live.
        deadline = time.monotonic() + 5
        while not all(vq.ready for vq in self.backend.vqs):
            assert time.monotonic() < deadline, "the backend did not bring the rings up"
            time.sleep(0.001)

    def stop(self) -> None:
        self.qemu_end.close()  # "QEMU disconnects": the backend returns
        if self._thread is not None:
            self._thread.join(5)
            assert not self._thread.is_alive(), "the backend did not exit when QEMU disconnected"
        if self.listener is not None:
            self.listener.close()
        for sock in self.host_sockets:
            sock.close()
        for fd in self.kick + self.call:
            os.close(fd)
        self.mem.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the guest driver --------------------------------------------------------------

    def post_rx(self, n: int = 8, size: int = RX_BUF) -> None:
        for _ in range(n):
            self.rx.add([(self.mem.alloc(size), size, True)])
        os.eventfd_write(self.kick[0], 1)

    def hdr(self, op: Op, *, dst_port: int, src_port: int | None = None, length: int = 0, flags: int = 0,
            buf_alloc: int = 65536, fwd_cnt: int = 0, src_cid: int | None = None, dst_cid: int = 2,
            type_: int = 1) -> bytes:  # fmt: skip
        return HDR.pack(
            self.guest_cid if src_cid is None else src_cid, dst_cid, self.guest_port if src_port is None else src_port,
            dst_port, length, type_, op, flags, buf_alloc, fwd_cnt,
        )  # fmt: skip

    def send_packet(self, header: bytes, payload: bytes = b"", *, split: bool = True) -> int:
        """Place a packet on TX (header and payload in separate descriptors, as Linux does)."""
        if split and payload:
            h, d = self.mem.alloc(len(header)), self.mem.alloc(len(payload))
            self.mem.write(h, header)
            self.mem.write(d, payload)
            head = self.tx.add([(h, len(header), False), (d, len(payload), False)])
        else:
            g = self.mem.alloc(len(header) + len(payload))
            self.mem.write(g, header + payload)
            head = self.tx.add([(g, len(header) + len(payload), False)])
        os.eventfd_write(self.kick[1], 1)
        return head

    def wait_call(self, index: int, timeout: float = 5.0) -> bool:
        r, _, _ = select.select([self.call[index]], [], [], timeout)
        if r:
            os.eventfd_read(self.call[index])
        return bool(r)

    def received(self, timeout: float = 5.0, want: int = 1) -> list[Packet]:
        """Packets the backend wrote into RX buffers (waits for at least ``want``)."""
        out: list[Packet] = []
        while len(out) < want:
            if not self.wait_call(0, timeout):
                break
            used = self.rx.take_used()
            for head, length in used:
                gpa, size, _f, _n = struct.unpack("<QIHH", self.mem.read(self.rx.desc + 16 * head, 16))
                data = self.mem.read(gpa, length)
                h = Header(*HDR.unpack_from(data))
                out.append(Packet(h, data[HDR_SIZE:length]))
                self.rx.add([(gpa, size, True)])  # refill with the same buffer, as Linux does
            if used:
                os.eventfd_write(self.kick[0], 1)
        return out


@contextmanager
def fake_qemu(workdir: Path, **setup: int) -> Iterator[FakeQemu]:
    q = FakeQemu(workdir)
    q.setup(**setup)
    try:
        yield q
    finally:
        q.stop()
