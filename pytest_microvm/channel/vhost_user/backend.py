"""The vhost-user server: one QEMU on the control socket, one poll loop, two rings.

QEMU is the client of the control socket and waits synchronously for some replies
(GET_VRING_BASE during resets and pauses): the loop never blocks on data work, and
each round of data work is bounded, so a control message is always answered within one
round. When QEMU disconnects the backend closes every connection and returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time

from pytest_microvm import _logging
from pytest_microvm.channel.vhost_user import messages as m
from pytest_microvm.channel.vhost_user.memory import BadAddress, GuestMemory
from pytest_microvm.channel.vhost_user.virtqueue import Virtqueue
from pytest_microvm.channel.vhost_user.vsock import MAX_CONTROL_BACKLOG, Muxer

log = _logging.logger(__name__)

RX, TX = 0, 1
_MAX_VRING_SIZE = 32768


class Backend:
    """Serves one QEMU connection for a guest with ``guest_cid``."""

    def __init__(self, control: socket.socket, muxer: Muxer) -> None:
        self.control = control
        self.muxer = muxer
        self.mem = GuestMemory()
        self.vqs = [Virtqueue(RX), Virtqueue(TX)]
        self.features = 0
        self.protocol_features = 0
        self.messages = 0

    # ---- the control socket ---------------------------------------------------------

    def read_message(self) -> m.Message | None:
        """One vhost-user message, or None when QEMU closed the socket."""
        try:
            header, fds, _flags, _addr = socket.recv_fds(self.control, m.HEADER.size, m.MAX_FDS)
        except ConnectionResetError:
            return None
        if not header:
            return None
        if len(header) != m.HEADER.size:
            raise m.VhostUserError(f"short vhost-user header ({len(header)} bytes)")
        request, flags, size = m.HEADER.unpack(header)
        if size > m.MAX_PAYLOAD:
            for fd in fds:
                os.close(fd)
            raise m.VhostUserError(f"request {request} with a {size}-byte payload")
        payload = b""
        while len(payload) < size:
            chunk = self.control.recv(size - len(payload))
            if not chunk:
                return None
            payload += chunk
        return m.Message(request, flags, payload, tuple(fds))

    def _send(self, data: bytes) -> None:
        self.control.sendall(data)

    def handle(self, msg: m.Message) -> None:
        self.messages += 1
        try:
            name = m.Request(msg.request).name
        except ValueError:
            name = str(msg.request)
        log.debug("vhost-user %s flags=%#x size=%d fds=%d", name, msg.flags, len(msg.payload), len(msg.fds))
        ok = True
        reply: bytes | None = None
        try:
            reply = self._dispatch(msg)
        except BadAddress as exc:
            log.error("vhost-user %s: %s", name, exc)
            ok = False
        if reply is not None:
            self._send(reply)
        elif msg.need_reply and self.protocol_features & m.PROTOCOL_F_REPLY_ACK:
            self._send(m.reply_u64(msg.request, 0 if ok else 1))

    def _vq(self, index: int) -> Virtqueue:
        if not 0 <= index < len(self.vqs):
            raise m.VhostUserError(f"vring index {index} (a vsock backend has {len(self.vqs)})")
        return self.vqs[index]

    def _take_fd(self, msg: m.Message) -> tuple[Virtqueue, int]:
        value = msg.u64()
        vq = self._vq(value & m.VRING_IDX_MASK)
        if value & m.VRING_NOFD_MASK or not msg.fds:
            for fd in msg.fds:
                os.close(fd)
            return vq, -1
        for fd in msg.fds[1:]:
            os.close(fd)
        os.set_blocking(msg.fds[0], False)
        return vq, msg.fds[0]

    def _dispatch(self, msg: m.Message) -> bytes | None:
        r = msg.request
        if r == m.Request.GET_FEATURES:
            return m.reply_u64(r, m.FEATURES)
        if r == m.Request.SET_FEATURES:
            self.features = msg.u64()
        elif r == m.Request.GET_PROTOCOL_FEATURES:
            return m.reply_u64(r, m.PROTOCOL_FEATURES)
        elif r == m.Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = msg.u64() & m.PROTOCOL_FEATURES
        elif r == m.Request.GET_QUEUE_NUM:
            return m.reply_u64(r, m.NUM_QUEUES)
        elif r in (m.Request.SET_OWNER, m.Request.RESET_OWNER):
            pass
        elif r == m.Request.SET_MEM_TABLE:
            self.mem.set_table(m.parse_mem_table(msg.payload), msg.fds)
            for vq in self.vqs:
                vq.map(self.mem)
        elif r == m.Request.SET_VRING_NUM:
            index, num = msg.vring_state()
            if not 0 < num <= _MAX_VRING_SIZE or num & (num - 1):
                raise m.VhostUserError(f"vring size {num} is not a power of two up to {_MAX_VRING_SIZE}")
            self._vq(index).size = num
        elif r == m.Request.SET_VRING_BASE:
            index, num = msg.vring_state()
            vq = self._vq(index)
            if num == 0 and vq.last_avail != 0:
                self._driver_reset(f"vring {index} restarts at 0 after {vq.last_avail}")
            vq.last_avail = num & 0xFFFF
        elif r == m.Request.SET_VRING_ADDR:
            addr = m.parse_vring_addr(msg.payload)
            vq = self._vq(addr.index)
            if vq.addr is not None and (vq.addr.desc, vq.addr.avail, vq.addr.used) != (
                addr.desc,
                addr.avail,
                addr.used,
            ):
                self._driver_reset(f"vring {addr.index} moved")
            vq.addr = addr
            vq.map(self.mem)
        elif r == m.Request.GET_VRING_BASE:
            index, _ = msg.vring_state()
            vq = self._vq(index)
            vq.stop()
            # Not a reason to drop connections: a paused VM stops its rings too, and
            # resumes them where they were. A driver reset shows when they restart.
            return m.reply(r, struct.pack("<II", index, vq.last_avail))
        elif r == m.Request.SET_VRING_KICK:
            vq, fd = self._take_fd(msg)
            vq.set_fd("kick_fd", fd)
        elif r == m.Request.SET_VRING_CALL:
            vq, fd = self._take_fd(msg)
            vq.set_fd("call_fd", fd)
        elif r == m.Request.SET_VRING_ERR:
            _vq, fd = self._take_fd(msg)
            if fd >= 0:
                os.close(fd)
        elif r == m.Request.SET_VRING_ENABLE:
            index, num = msg.vring_state()
            self._vq(index).enabled = bool(num)
        elif r == m.Request.GET_CONFIG:
            if len(msg.payload) < 12:
                raise m.VhostUserError("GET_CONFIG payload too short")
            offset, size, flags = struct.unpack_from("<III", msg.payload)
            config = struct.pack("<Q", self.muxer.guest_cid)  # struct virtio_vsock_config
            data = config[offset : offset + size].ljust(size, b"\0")
            return m.reply(r, struct.pack("<III", offset, size, flags) + data)
        elif r == m.Request.SET_CONFIG:
            pass  # the CID is ours to say; the guest cannot change it
        else:
            for fd in msg.fds:
                os.close(fd)
            log.warning("ignoring unsupported vhost-user request %d", r)
            if msg.need_reply:
                return m.reply_u64(r, 1)
        return None

    def _driver_reset(self, why: str) -> None:
        """The guest driver started over (reset, reboot): its connections are gone, so are ours."""
        if self.muxer.conns or self.muxer.pending_hosts:
            log.info("guest driver reset (%s): closing %d connections", why, len(self.muxer.conns))
        self.muxer.reset()

    # ---- the loop -------------------------------------------------------------------

    def serve(self) -> None:
        """Run until QEMU disconnects."""
        rx, tx = self.vqs
        poller = select.poll
        try:
            while True:
                p = poller()
                p.register(self.control, select.POLLIN)
                for vq in self.vqs:
                    if vq.kick_fd >= 0:
                        p.register(vq.kick_fd, select.POLLIN)
                rx_has = rx.has_avail()
                for fd, ev in self.muxer.wanted_events(rx_has):
                    p.register(fd, ev)
                # Work left from a bounded round means poll without sleeping; a TX ring
                # paused on a full control backlog is not work until RX buffers return.
                tx_work = tx.has_avail() and len(self.muxer.control) < MAX_CONTROL_BACKLOG
                busy = tx_work or (rx_has and bool(self.muxer.control))
                timeout = self.muxer.expire()
                wait_ms = 0 if busy else (-1 if timeout is None else int(timeout * 1000) + 1)
                for fd, events in p.poll(wait_ms):
                    if fd == self.control.fileno():
                        msg = self.read_message()
                        if msg is None:
                            log.info("QEMU disconnected")
                            return
                        self.handle(msg)
                    elif fd in (rx.kick_fd, tx.kick_fd):
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(fd)
                    else:
                        self.muxer.on_event(fd, events, rx, self.mem)
                if tx.ready:
                    self.muxer.process_tx(tx, self.mem)
                if rx.ready:
                    self.muxer.fill_rx(rx, self.mem)
                    rx.notify()
        finally:
            self.close()

    def close(self) -> None:
        self.muxer.reset()
        for vq in self.vqs:
            vq.reset()
        self.mem.close()
        self.control.close()


def run(control: socket.socket, uds: str, guest_cid: int, accept_timeout: float | None = None) -> int:
    """Serve one VM: accept QEMU on the listening ``control`` socket, bind ``uds`` for the
    host side, serve until QEMU disconnects, then remove ``uds``. Returns the exit status.

    What a backend process does, whether it is an interpreter of its own (``python -m
    pytest_microvm.channel.vhost_user``) or a child of the fork server (:mod:`.forkserver`).
    """
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        host.bind(uds)
        host.listen(128)
        host.setblocking(False)
        serve_one(control, Muxer(guest_cid, uds, host), accept_timeout)
    except TimeoutError:
        log.error("QEMU did not connect within %ss", accept_timeout)
        return 1
    finally:
        control.close()
        host.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uds)
    return 0


def serve_one(listener: socket.socket, muxer: Muxer, accept_timeout: float | None = None) -> Backend:
    """Accept QEMU on ``listener`` and serve it until it disconnects."""
    listener.settimeout(accept_timeout)
    start = time.monotonic()
    control, _ = listener.accept()
    control.setblocking(True)
    log.info("QEMU connected after %.2fs", time.monotonic() - start)
    backend = Backend(control, muxer)
    backend.serve()
    return backend
