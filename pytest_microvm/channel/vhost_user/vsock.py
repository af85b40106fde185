"""The virtio-vsock device: guest stream connections mapped to host Unix sockets.

Firecracker's "hybrid vsock" model:

- the guest connects to CID 2 port P  → we connect to the Unix socket ``<uds>_<P>``;
  if nothing listens there the guest gets RST at once;
- a host program connects to ``<uds>`` and writes ``CONNECT <P>\\n`` → we open a
  connection to guest port P and answer ``OK <local port>\\n``, or close the socket if
  the guest refuses.

Credit-based flow control runs both ways (virtio 1.2 §5.10.6.3), half-close maps to
``shutdown(SHUT_WR)``, and everything the guest sends is checked before it is trusted.
This module knows nothing about vhost-user: it takes chains from the TX ring, writes
chains into the RX ring, and tells the event loop which sockets it wants to hear from.
"""

from __future__ import annotations

import collections
import enum
import errno
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from pytest_microvm import _logging
from pytest_microvm.channel.vhost_user.memory import GuestMemory
from pytest_microvm.channel.vhost_user.virtqueue import Chain, Virtqueue

log = _logging.logger(__name__)

HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HDR_SIZE = HDR.size  # 44
HOST_CID = 2
TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
MAX_PKT_PAYLOAD = 64 * 1024  # what Linux sends at most per packet
BUF_ALLOC = 1024 * 1024  # our per-connection receive buffer (guest→host bytes not yet forwarded)
CONNECT_LINE_MAX = 64
HOST_CONNECT_TIMEOUT = 10.0  # seconds the guest has to answer a host-initiated REQUEST
MAX_CONTROL_BACKLOG = 1024  # control packets queued for the guest before TX processing pauses
U32 = 0xFFFFFFFF


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op,
            self.flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip


_OPS = frozenset(int(op) for op in Op)


class State(enum.Enum):
    HOST_CONNECTING = "waiting for the host socket's connect()"  # guest-initiated, backlog was full
    GUEST_CONNECTING = "waiting for the guest's RESPONSE"  # host-initiated
    ESTABLISHED = "established"


@dataclass(eq=False)
class Conn:
    """One stream connection: host Unix socket ⇄ guest (cid, peer_port)."""

    sock: socket.socket
    local_port: int  # the host-side vsock port (CID 2)
    peer_port: int  # the guest's port
    state: State
    deadline: float = 0.0
    connect_path: str = ""
    # guest → host: bytes received from the guest, not yet written to the socket
    out: bytearray = field(default_factory=bytearray)
    out_prefix: int = 0  # leading bytes of ``out`` that are ours (the OK line), not the guest's
    fwd_cnt: int = 0  # bytes written to the socket (what we report as fwd_cnt)
    fwd_cnt_told: int = 0  # the fwd_cnt the guest last heard from us
    peer_shutdown: int = 0  # SHUTDOWN flags the guest sent
    wr_shut: bool = False  # we did shutdown(SHUT_WR) on the socket
    # host → guest
    tx_cnt: int = 0  # bytes sent to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    credit_requested: bool = False
    host_eof: bool = False  # the socket reached EOF; SHUTDOWN(SEND) told the guest

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32)


@dataclass(eq=False)
class PendingHost:
    """A host connection to ``<uds>`` that has not finished its CONNECT line."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0


class Muxer:
    """Moves packets between the guest's vsock rings and host Unix sockets."""

    def __init__(self, guest_cid: int, uds_path: str, listener: socket.socket | None) -> None:
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listener
        self.conns: dict[tuple[int, int], Conn] = {}
        self.by_fd: dict[int, Conn | PendingHost] = {}
        self.pending_hosts: list[PendingHost] = []
        self.control: collections.deque[bytes] = collections.deque()  # header-only packets for the guest
        self._next_port = 49152
        self.stats = collections.Counter[str]()  # events worth counting (RSTs, drops, errors)
        self.bytes_to_guest = 0  # plain ints for the per-packet counts: cheaper than a Counter
        self.bytes_from_guest = 0

    # ---- packets to the guest -------------------------------------------------------

    def _hdr(self, conn: Conn | None, op: Op, *, src_port: int = 0, dst_port: int = 0, length: int = 0,
             flags: int = 0) -> bytes:  # fmt: skip
        if conn is not None:
            src_port, dst_port = conn.local_port, conn.peer_port
            conn.fwd_cnt_told = conn.fwd_cnt
            fwd = conn.fwd_cnt & U32
        else:
            fwd = 0
        return HDR.pack(HOST_CID, self.guest_cid, src_port, dst_port, length, TYPE_STREAM, op, flags, BUF_ALLOC, fwd)

    def _send_control(self, conn: Conn | None, op: Op, **kw: int) -> None:
        self.control.append(self._hdr(conn, op, **kw))

    def _rst(self, src_port: int, dst_port: int) -> None:
        self.stats["rst_sent"] += 1
        self._send_control(None, Op.RST, src_port=src_port, dst_port=dst_port)

    # ---- connection bookkeeping ------------------------------------------------------

    def _add(self, conn: Conn) -> None:
        self.conns[conn.key] = conn
        self.by_fd[conn.sock.fileno()] = conn

    def _close(self, conn: Conn, *, rst: bool) -> None:
        if rst:
            self._rst(conn.local_port, conn.peer_port)
        self.conns.pop(conn.key, None)
        self.by_fd.pop(conn.sock.fileno(), None)
        conn.sock.close()

    def _close_pending(self, pending: PendingHost) -> None:
        self.pending_hosts.remove(pending)
        self.by_fd.pop(pending.sock.fileno(), None)
        pending.sock.close()

    def reset(self) -> None:
        """The guest driver went away (reset, reboot): every connection is gone."""
        for conn in list(self.conns.values()):
            self._close(conn, rst=False)
        for pending in list(self.pending_hosts):
            self._close_pending(pending)
        self.control.clear()

    def close(self) -> None:
        self.reset()
        if self.listener is not None:
            self.listener.close()

    def _alloc_port(self, peer_port: int) -> int:
        for _ in range(65536):
            port = self._next_port
            self._next_port = 49152 if self._next_port >= 65535 else self._next_port + 1
            if (port, peer_port) not in self.conns:
                return port
        raise OSError(errno.EADDRINUSE, "no free vsock port")

    # ---- TX: packets from the guest --------------------------------------------------

    def process_tx(self, tx: Virtqueue, mem: GuestMemory, budget: int = 256) -> None:
        """Handle up to ``budget`` packets the guest queued; pauses while control replies back up."""
        tx.suppress_kicks(True)
        while budget > 0 and len(self.control) < MAX_CONTROL_BACKLOG:
            chain = tx.pop(mem)
            if chain is None:
                # Idle: kicks back on, then one more look for a packet that raced it.
                tx.suppress_kicks(False)
                chain = tx.pop(mem)
                if chain is None:
                    break
                tx.suppress_kicks(True)
            budget -= 1
            self._handle_tx_chain(chain)
            tx.push(chain.head, 0)  # TX buffers are only read: used length 0
        tx.notify()

    def _handle_tx_chain(self, chain: Chain) -> None:
        try:
            self._handle_tx_packet(chain)
        except Exception:
            # A bug of ours must not take every guest connection down with the process.
            self.stats["internal_error"] += 1
            log.exception("internal error handling a guest packet; dropped")

    def _handle_tx_packet(self, chain: Chain) -> None:
        if chain.error:
            self.stats["bad_chain"] += 1
            log.warning("dropping a malformed TX chain: %s", chain.error)
            return
        data = chain.read()
        if len(data) < HDR_SIZE:
            self.stats["short_packet"] += 1
            return
        h = Header(*HDR.unpack_from(data))
        if h.src_cid != self.guest_cid:
            self.stats["wrong_src_cid"] += 1  # spoofed: drop without a word
            return
        if h.op == Op.RST:
            conn = self.conns.get((h.dst_port, h.src_port))
            if conn is not None:
                self._close(conn, rst=False)
            return
        if h.dst_cid != HOST_CID or h.type != TYPE_STREAM or h.op not in _OPS:
            self.stats["rst_unsupported"] += 1
            return self._rst(h.dst_port, h.src_port)
        if h.len > MAX_PKT_PAYLOAD or h.len > len(data) - HDR_SIZE:
            self.stats["rst_bad_length"] += 1
            conn = self.conns.get((h.dst_port, h.src_port))
            if conn is not None:
                return self._close(conn, rst=True)
            return self._rst(h.dst_port, h.src_port)
        conn = self.conns.get((h.dst_port, h.src_port))
        if h.op == Op.REQUEST:
            if conn is not None:
                return self._close(conn, rst=True)
            return self._guest_connect(h)
        if conn is None:
            return self._rst(h.dst_port, h.src_port)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        if h.op == Op.RESPONSE:
            if conn.state is not State.GUEST_CONNECTING:
                return self._close(conn, rst=True)
            conn.state = State.ESTABLISHED
            ok = f"OK {conn.local_port}\n".encode()
            conn.out[:0] = ok
            conn.out_prefix += len(ok)
            self._flush(conn)
        elif h.op == Op.RW:
            if conn.state is not State.ESTABLISHED or conn.peer_shutdown & SHUTDOWN_SEND:
                return self._close(conn, rst=True)
            if len(conn.out) - conn.out_prefix + h.len > BUF_ALLOC:
                log.warning("guest overran its credit on %s; resetting", conn.key)
                return self._close(conn, rst=True)
            conn.out += data[HDR_SIZE : HDR_SIZE + h.len]
            self.bytes_from_guest += h.len
            self._flush(conn)
        elif h.op == Op.CREDIT_UPDATE:
            conn.credit_requested = False
        elif h.op == Op.CREDIT_REQUEST:
            self._send_control(conn, Op.CREDIT_UPDATE)
        elif h.op == Op.SHUTDOWN:
            conn.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._flush(conn)

    def _guest_connect(self, h: Header) -> None:
        path = f"{self.uds_path}_{h.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        conn = Conn(sock, h.dst_port, h.src_port, State.HOST_CONNECTING, peer_buf_alloc=h.buf_alloc,
                    peer_fwd_cnt=h.fwd_cnt, connect_path=path, deadline=time.monotonic() + 1.0)  # fmt: skip
        self._try_host_connect(conn, new=True)

    def _try_host_connect(self, conn: Conn, *, new: bool) -> None:
        try:
            conn.sock.connect(conn.connect_path)
        except BlockingIOError:
            # A Unix listener's backlog is full: retry from the event loop for a while.
            if new:
                self._add(conn)
            if time.monotonic() > conn.deadline:
                self._close(conn, rst=True)
            return
        except OSError as exc:
            log.debug("guest connect to %s refused: %s", conn.connect_path, exc)
            self.stats["rst_no_listener"] += 1
            if not new:
                self._close(conn, rst=True)
            else:
                conn.sock.close()
                self._rst(conn.local_port, conn.peer_port)
            return
        if new:
            self._add(conn)
        conn.state = State.ESTABLISHED
        self.stats["guest_connects"] += 1
        self._send_control(conn, Op.RESPONSE)

    # ---- the host side: sockets -----------------------------------------------------

    def _flush(self, conn: Conn) -> None:
        """Write what the guest sent to the socket; settle shutdowns; grant credit."""
        if conn.out:
            try:
                n = conn.sock.send(conn.out)
            except BlockingIOError:
                n = 0
            except OSError:
                return self._close(conn, rst=True)  # the host side is gone
            if n:
                del conn.out[:n]
                ours = min(n, conn.out_prefix)
                conn.out_prefix -= ours
                conn.fwd_cnt += n - ours
        if conn.out:
            return
        if conn.peer_shutdown & SHUTDOWN_SEND and not conn.wr_shut:
            conn.wr_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return self._close(conn, rst=True)
        if conn.peer_shutdown & SHUTDOWN_SEND and (conn.host_eof or conn.peer_shutdown & SHUTDOWN_RCV):
            # Both directions are done: the guest waits for our RST to free its socket.
            return self._close(conn, rst=True)
        if conn.state is State.ESTABLISHED and conn.fwd_cnt - conn.fwd_cnt_told >= BUF_ALLOC // 4:
            self._send_control(conn, Op.CREDIT_UPDATE)

    def accept_host(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        pending = PendingHost(sock, deadline=time.monotonic() + HOST_CONNECT_TIMEOUT)
        self.pending_hosts.append(pending)
        self.by_fd[sock.fileno()] = pending

    def _read_connect_line(self, pending: PendingHost, rx_ready: bool) -> None:
        try:
            # Byte by byte up to the newline: what follows it is data for the guest.
            while not pending.line.endswith(b"\n"):
                b = pending.sock.recv(1)
                if not b:
                    return self._close_pending(pending)
                pending.line += b
                if len(pending.line) > CONNECT_LINE_MAX:
                    return self._close_pending(pending)
        except BlockingIOError:
            return
        except OSError:
            return self._close_pending(pending)
        words = pending.line.decode(errors="replace").split()
        if len(words) != 2 or words[0].upper() != "CONNECT" or not words[1].isdigit() or not rx_ready:
            return self._close_pending(pending)  # bad line, or no guest driver to connect to
        peer_port = int(words[1])
        self.pending_hosts.remove(pending)
        del self.by_fd[pending.sock.fileno()]
        conn = Conn(pending.sock, self._alloc_port(peer_port), peer_port, State.GUEST_CONNECTING,
                    deadline=time.monotonic() + HOST_CONNECT_TIMEOUT)  # fmt: skip
        self._add(conn)
        self.stats["host_connects"] += 1
        self._send_control(conn, Op.REQUEST)

    def wanted_events(self, rx_has_buffers: bool) -> list[tuple[int, int]]:
        """(fd, poll events) for every socket the loop should watch now."""
        events = []
        if self.listener is not None:
            events.append((self.listener.fileno(), select.POLLIN))
        for pending in self.pending_hosts:
            events.append((pending.sock.fileno(), select.POLLIN))
        for conn in self.conns.values():
            ev = 0
            if conn.out:
                ev |= select.POLLOUT
            if (
                rx_has_buffers
                and conn.state is State.ESTABLISHED
                and not conn.host_eof
                and not conn.peer_shutdown & SHUTDOWN_RCV
                and conn.peer_credit() > 0
            ):
                ev |= select.POLLIN
            if ev:
                events.append((conn.sock.fileno(), ev))
        return events

    def on_event(self, fd: int, events: int, rx: Virtqueue, mem: GuestMemory) -> None:
        if self.listener is not None and fd == self.listener.fileno():
            return self.accept_host()
        target = self.by_fd.get(fd)
        if target is None:
            return
        if isinstance(target, PendingHost):
            return self._read_connect_line(target, rx.ready)
        if events & select.POLLOUT:
            self._flush(target)
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and target.key in self.conns:
            self._host_to_guest(target, rx, mem)

    def _host_to_guest(self, conn: Conn, rx: Virtqueue, mem: GuestMemory, budget: int = 32) -> None:
        """Read from the socket straight into guest RX buffers, within the guest's credit."""
        sock = conn.sock
        while budget > 0:
            credit = conn.peer_buf_alloc - ((conn.tx_cnt - conn.peer_fwd_cnt) & U32)
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self._send_control(conn, Op.CREDIT_REQUEST)
                return
            chain = rx.pop(mem)
            if chain is None:
                return
            if chain.error or chain.writable_len < HDR_SIZE:
                log.warning("dropping a malformed RX chain: %s", chain.error or "shorter than a header")
                rx.push(chain.head, 0)
                continue
            budget -= 1
            cap = min(chain.writable_len - HDR_SIZE, credit, MAX_PKT_PAYLOAD)
            try:
                n = self._recv_into_chain(sock, chain, cap)
            except BlockingIOError:
                rx.last_avail = (rx.last_avail - 1) & 0xFFFF  # give the buffer back unused
                return
            except OSError:
                rx.last_avail = (rx.last_avail - 1) & 0xFFFF
                return self._close(conn, rst=True)
            if n == 0:
                conn.host_eof = True
                chain.write(self._hdr(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND))
                rx.push(chain.head, HDR_SIZE)
                self._flush(conn)  # may complete the close
                return
            conn.tx_cnt = (conn.tx_cnt + n) & U32
            conn.fwd_cnt_told = conn.fwd_cnt
            mm, off, length = chain.writable[0]
            # The header after the payload landed, packed in place (the common single-buffer case).
            hdr = (HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, n, TYPE_STREAM, Op.RW, 0, BUF_ALLOC,
                   conn.fwd_cnt & U32)  # fmt: skip
            if length >= HDR_SIZE:
                HDR.pack_into(mm, off, *hdr)
            else:
                chain.write(HDR.pack(*hdr))
            rx.push(chain.head, HDR_SIZE + n)
            self.bytes_to_guest += n

    @staticmethod
    def _recv_into_chain(sock: socket.socket, chain: Chain, cap: int) -> int:
        mm, off, length = chain.writable[0]
        if length - HDR_SIZE >= cap:
            # The common case (Linux posts one buffer per packet): no copy in Python.
            return sock.recv_into(memoryview(mm)[off + HDR_SIZE : off + HDR_SIZE + cap], cap)
        buf = bytearray(cap)
        n = sock.recv_into(buf, cap)
        chain.write(memoryview(buf)[:n], skip=HDR_SIZE)
        return n

    def fill_rx(self, rx: Virtqueue, mem: GuestMemory) -> None:
        """Deliver queued control packets into RX buffers."""
        while self.control:
            chain = rx.pop(mem)
            if chain is None:
                break
            if chain.error or chain.writable_len < HDR_SIZE:
                rx.push(chain.head, 0)
                continue
            chain.write(self.control.popleft())
            rx.push(chain.head, HDR_SIZE)

    def expire(self) -> float | None:
        """Close what waited too long; return seconds until the next deadline, if any."""
        now = time.monotonic()
        nearest = None
        for pending in list(self.pending_hosts):
            if now > pending.deadline:
                self._close_pending(pending)
            else:
                nearest = min(nearest or pending.deadline, pending.deadline)
        for conn in list(self.conns.values()):
            if conn.state is State.ESTABLISHED:
                continue
            if conn.state is State.HOST_CONNECTING:
                self._try_host_connect(conn, new=False)  # closes it once the deadline passed
                if conn.key in self.conns:
                    nearest = min(nearest or now + 0.01, now + 0.01)
                continue
            if now > conn.deadline:
                self._close(conn, rst=conn.state is State.GUEST_CONNECTING)
            else:
                nearest = min(nearest or conn.deadline, conn.deadline)
        return None if nearest is None else max(0.0, nearest - now)
