"""The userspace vsock backend without a VM: virtqueues on fake guest memory, QEMU's recorded
vhost-user traces replayed over a socketpair, and this test acting as the guest driver.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path

import pytest

from pytest_microvm.channel.vhost_user import messages as m
from pytest_microvm.channel.vhost_user.backend import Backend
from pytest_microvm.channel.vhost_user.memory import GuestMemory
from pytest_microvm.channel.vhost_user.virtqueue import Virtqueue
from pytest_microvm.channel.vhost_user.vsock import BUF_ALLOC, SHUTDOWN_RCV, SHUTDOWN_SEND, Muxer, Op
from tests.vhost_fake import FakeDriver, FakeGuestMemory, FakeQemu, fake_qemu

# Recorded from QEMU 7.2; see tests/data/README.md.
TRACES = Path(__file__).resolve().parents[1] / "data" / "qemu-7.2-vhost-user-traces"

# ---- virtqueues on fake guest memory -----------------------------------------------------


@pytest.fixture
def ring() -> tuple[FakeGuestMemory, FakeDriver, GuestMemory, Virtqueue]:
    mem = FakeGuestMemory()
    drv = FakeDriver(mem)
    gm = GuestMemory()
    payload, fds = mem.table()
    gm.set_table(m.parse_mem_table(payload), tuple(fds))
    vq = Virtqueue(0)
    vq.size = drv.size
    vq.addr = m.parse_vring_addr(drv.addr_payload(0))
    vq.map(gm)
    vq.kick_fd = os.eventfd(0)
    vq.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
    vq.enabled = True
    yield mem, drv, gm, vq
    vq.reset()
    gm.close()
    mem.close()


def test_single_and_multi_descriptor_chains(ring: tuple[FakeGuestMemory, FakeDriver, GuestMemory, Virtqueue]) -> None:
    mem, drv, gm, vq = ring
    a = mem.alloc(5)
    mem.write(a, b"hello")
    drv.add([(a, 5, False)])
    b, c, w1, w2 = mem.alloc(3), mem.alloc(4), mem.alloc(2), mem.alloc(8)
    mem.write(b, b"abc")
    mem.write(c, b"defg")
    drv.add([(b, 3, False), (c, 4, False), (w1, 2, True), (w2, 8, True)])
    first = vq.pop(gm)
    assert first is not None and first.error is None and first.read() == b"hello" and not first.writable
    second = vq.pop(gm)
    assert second is not None and second.read() == b"abcdefg" and second.writable_len == 10
    # Scatter across the two writable buffers, after a skipped prefix.
    assert second.write(b"XYZ123", skip=1) == 6
    assert mem.read(w1, 2) == b"\0X" and mem.read(w2, 8) == b"YZ123\0\0\0"
    assert vq.pop(gm) is None
    vq.push(first.head, 0)
    vq.push(second.head, 7)
    assert drv.take_used() == [(first.head, 0), (second.head, 7)]


def test_u16_index_wraparound(ring: tuple[FakeGuestMemory, FakeDriver, GuestMemory, Virtqueue]) -> None:
    mem, drv, gm, vq = ring
    drv.start_at(65534)
    vq.last_avail = 65534
    vq.map(gm)  # re-reads used.idx from memory, as after SET_VRING_ADDR
    heads = [drv.add([(mem.alloc(4), 4, True)]) for _ in range(4)]
    popped = [vq.pop(gm) for _ in range(4)]
    assert [c.head for c in popped if c] == heads
    assert vq.last_avail == 2 and vq.pop(gm) is None
    for c in popped:
        assert c is not None
        vq.push(c.head, 4)
    assert vq.used_idx == 2
    assert drv.take_used() == [(h, 4) for h in heads]


def test_notification_and_its_suppression(ring: tuple[FakeGuestMemory, FakeDriver, GuestMemory, Virtqueue]) -> None:
    mem, drv, gm, vq = ring
    drv.add([(mem.alloc(4), 4, True)])
    chain = vq.pop(gm)
    assert chain is not None
    vq.notify()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(vq.call_fd)  # nothing pushed: no interrupt
    vq.push(chain.head, 1)
    vq.notify()
    assert os.eventfd_read(vq.call_fd) == 1
    drv.set_no_interrupt(True)
    drv.add([(mem.alloc(4), 4, True)])
    chain = vq.pop(gm)
    assert chain is not None
    vq.push(chain.head, 1)
    vq.notify()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(vq.call_fd)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda mem, drv: drv.publish(99), "head index 99"),
        (lambda mem, drv: drv.add([(0x10_0000_0000, 16, False)]), "outside guest memory"),
        (lambda mem, drv: drv.add([(0x9FF00, 0x200, False)]), "outside guest memory"),  # runs into the hole
        (lambda mem, drv: drv.add([(mem.alloc(4), 4, False)], raw_flags={0: 4}), "indirect"),
        (lambda mem, drv: drv.add([(mem.alloc(4), 4, False), (mem.alloc(4), 4, False)], raw_flags={1: 1}), "loops"),
    ],
    ids=["head-out-of-range", "outside-memory", "across-the-hole", "indirect", "loop"],
)
def test_malformed_chains_are_reported_not_followed(
    ring: tuple[FakeGuestMemory, FakeDriver, GuestMemory, Virtqueue], make: object, error: str
) -> None:
    mem, drv, gm, vq = ring
    if error == "loops":
        # Descriptor 1 points back at descriptor 0: NEXT forever.
        make(mem, drv)  # type: ignore[operator]
        struct.pack_into("<H", mem.mm, mem.offset(drv.desc) + 16 + 14, 0)
    else:
        make(mem, drv)  # type: ignore[operator]
    chain = vq.pop(gm)
    assert chain is not None and chain.error is not None and error in chain.error


# ---- QEMU's recorded traces, replayed ------------------------------------------------------

REGION = re.compile(r"\[gpa=(0x[0-9a-f]+) size=(0x[0-9a-f]+) uva=(0x[0-9a-f]+) mmap_off=(0x[0-9a-f]+)\]")
LINE = re.compile(r"^\s*[\d.]+ (\w+)\s+req=\s*(\d+) flags=(0x[0-9a-f]+) size=\s*(\d+) nfds=(\d) ?(.*)$")


def trace_messages(name: str) -> list[tuple[int, int, bytes, int, str]]:
    """(request, flags, payload, nfds, text) for each message line of a recorded trace."""
    out = []
    for line in (TRACES / name).read_text().splitlines():
        match = LINE.match(line)
        if not match:
            continue
        _name, req, flags, size, nfds, rest = match.groups()
        kv = dict(re.findall(r"(\w+)=(0x[0-9a-f]+|\d+)", rest.split("[")[0]))
        num = {k: int(v, 0) for k, v in kv.items()}
        request = int(req)
        if "u64" in num:
            payload = struct.pack("<Q", num["u64"])
        elif request == m.Request.SET_VRING_ADDR:
            payload = struct.pack("<IIQQQQ", *(num[k] for k in ("index", "flags", "desc", "used", "avail", "log")))
        elif request == m.Request.GET_CONFIG:
            payload = struct.pack("<III", num["offset"], num["size"], num["flags"]) + b"\0" * num["size"]
        elif request == m.Request.SET_MEM_TABLE:
            regions = REGION.findall(rest)
            payload = struct.pack("<II", len(regions), 0) + b"".join(
                struct.pack("<QQQQ", *(int(x, 16) for x in r)) for r in regions
            )
        elif "index" in num:
            payload = struct.pack("<II", num["index"], num["num"])
        else:
            payload = b""
        assert len(payload) == int(size), line
        out.append((request, int(flags, 16), payload, int(nfds), line))
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("trace", ["trace_ack.log", "trace_cfg.log", "trace_kill.log", "trace_nomem.log"])
def test_replay_recorded_qemu_trace(trace: str, tmp_path: Path) -> None:
    fds_before = open_fds()
    memfd = os.memfd_create("replay-ram")
    os.ftruncate(memfd, 0x20000000 + 0xC0000)  # 512 MiB, sparse: the traces' guest size
    qemu_end, backend_end = socket.socketpair()
    backend = Backend(backend_end, Muxer(7, str(tmp_path / "vsock"), None))
    replies: list[tuple[int, int, bytes]] = []
    vring_bases = []
    for request, flags, payload, nfds, line in trace_messages(trace):
        fds = [os.dup(memfd) if request == m.Request.SET_MEM_TABLE else os.eventfd(0) for _ in range(nfds)]
        data = m.encode(request, payload, flags)
        if fds:
            socket.send_fds(qemu_end, [data], fds)
            for fd in fds:
                os.close(fd)
        else:
            qemu_end.sendall(data)
        msg = backend.read_message()
        assert msg is not None, line
        backend.handle(msg)
        if request in (1, 11, 15, 17, 24) or flags & m.FLAG_NEED_REPLY:
            rreq, rflags, size = m.HEADER.unpack(qemu_end.recv(12))
            body = qemu_end.recv(size) if size else b""
            assert (rreq, rflags) == (request, 0x5), f"reply flags must be exactly 0x5: {line}"
            replies.append((request, size, body))
            if request == m.Request.GET_VRING_BASE:
                vring_bases.append(struct.unpack("<II", body))
        if request == m.Request.SET_VRING_ENABLE and payload == struct.pack("<II", 1, 1):
            assert all(vq.ready for vq in backend.vqs), "both rings live after ENABLE"
    by_request = {r: (size, body) for r, size, body in replies}
    assert struct.unpack("<Q", by_request[m.Request.GET_FEATURES][1])[0] == m.FEATURES
    assert struct.unpack("<Q", by_request[m.Request.GET_PROTOCOL_FEATURES][1])[0] & m.PROTOCOL_F_CONFIG
    size, body = by_request[m.Request.GET_CONFIG]
    assert size == 20 and struct.unpack_from("<IIIQ", body) == (0, 8, 0, 7)  # the guest CID, le64
    if trace == "trace_ack.log":
        assert by_request[m.Request.SET_MEM_TABLE] == (8, struct.pack("<Q", 0))  # REPLY_ACK honoured
        # Stop, restart, stop: GET_VRING_BASE reports the position, the rings are torn down.
        assert vring_bases == [(0, 0), (1, 0), (0, 0), (1, 0)]
        assert all(not vq.ready and vq.kick_fd < 0 for vq in backend.vqs)
    if trace == "trace_nomem.log":
        assert not backend.mem.mapped and not any(vq.ready for vq in backend.vqs)
    qemu_end.close()
    assert backend.read_message() is None  # QEMU went away
    backend.close()
    os.close(memfd)
    assert open_fds() == fds_before, "the backend leaked file descriptors"


def test_get_vring_base_reports_the_position_across_stop_and_restart(tmp_path: Path) -> None:
    with fake_qemu(tmp_path, tx_start=7) as q:
        q.post_rx()
        q.send_packet(q.hdr(Op.RST, dst_port=1))  # consumed: position 8
        deadline = time.monotonic() + 5
        while q.tx.take_used() == [] and time.monotonic() < deadline:
            time.sleep(0.01)
        q.send(m.Request.GET_VRING_BASE, struct.pack("<II", 1, 0))
        assert q.recv_reply() == (m.Request.GET_VRING_BASE, 0x5, struct.pack("<II", 1, 8))


# ---- the test as the guest driver --------------------------------------------------------


def test_guest_connect_data_both_ways_and_close(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        host = q.host_listener(1024)
        q.post_rx()
        q.send_packet(q.hdr(Op.REQUEST, dst_port=1024))
        (resp,) = q.received()
        assert (resp.hdr.op, resp.hdr.src_cid, resp.hdr.dst_cid) == (Op.RESPONSE, 2, 3)
        assert (resp.hdr.src_port, resp.hdr.dst_port, resp.hdr.buf_alloc) == (1024, q.guest_port, BUF_ALLOC)
        conn, _ = host.accept()
        q.host_sockets.append(conn)
        q.send_packet(q.hdr(Op.RW, dst_port=1024, length=5), b"hello")
        conn.settimeout(5)
        assert conn.recv(100) == b"hello"
        conn.sendall(b"world")
        (rw,) = q.received()
        assert (rw.hdr.op, rw.hdr.len, rw.payload) == (Op.RW, 5, b"world")
        assert rw.hdr.fwd_cnt == 5  # our receive counter rides on every packet
        # Guest half-closes: the host reads EOF but can still send.
        q.send_packet(q.hdr(Op.SHUTDOWN, dst_port=1024, flags=SHUTDOWN_SEND))
        assert conn.recv(100) == b""
        conn.sendall(b"late")
        (late,) = q.received()
        assert late.payload == b"late"
        # Host closes: SHUTDOWN(SEND) to the guest, then RST (both directions are done).
        conn.close()
        pkts = q.received(want=2)
        assert [(p.hdr.op, p.hdr.flags) for p in pkts] == [(Op.SHUTDOWN, SHUTDOWN_SEND), (Op.RST, 0)]
        assert q.muxer.conns == {}


def test_guest_connect_with_nobody_listening_gets_rst_at_once(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        q.post_rx()
        start = time.monotonic()
        q.send_packet(q.hdr(Op.REQUEST, dst_port=4444))
        (rst,) = q.received()
        assert rst.hdr.op == Op.RST and rst.hdr.src_port == 4444 and time.monotonic() - start < 2


def connect_host(q: FakeQemu, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(q.uds)
    sock.sendall(f"connect {port}\n".encode())  # the keyword is case-insensitive
    return sock


def test_host_connect_ok_and_refused(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        q.post_rx()
        sock = connect_host(q, 5000)
        (req,) = q.received()
        assert (req.hdr.op, req.hdr.dst_port, req.hdr.dst_cid) == (Op.REQUEST, 5000, 3)
        local = req.hdr.src_port
        q.send_packet(q.hdr(Op.RESPONSE, src_port=5000, dst_port=local))
        assert sock.recv(100) == f"OK {local}\n".encode()
        sock.sendall(b"ping")
        (rw,) = q.received()
        assert (rw.hdr.op, rw.payload, rw.hdr.src_port) == (Op.RW, b"ping", local)
        # A refused connection: the guest answers RST, the host socket closes.
        refused = connect_host(q, 5001)
        (req2,) = q.received()
        q.send_packet(q.hdr(Op.RST, src_port=5001, dst_port=req2.hdr.src_port))
        assert refused.recv(100) == b""
        sock.close()
        refused.close()


def test_credit_limits_what_the_host_sends_and_credit_request(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        q.post_rx(16)
        sock = connect_host(q, 6000)
        (req,) = q.received()
        local = req.hdr.src_port
        q.send_packet(q.hdr(Op.RESPONSE, src_port=6000, dst_port=local, buf_alloc=1000))
        assert sock.recv(100).startswith(b"OK ")
        sock.sendall(b"x" * 5000)
        got = q.received(want=2)  # 1000 bytes of data, then CREDIT_REQUEST
        assert sum(len(p.payload) for p in got if p.hdr.op == Op.RW) == 1000
        assert got[-1].hdr.op == Op.CREDIT_REQUEST
        assert q.received(timeout=0.3) == []  # nothing beyond the credit
        q.send_packet(q.hdr(Op.CREDIT_UPDATE, src_port=6000, dst_port=local, buf_alloc=1000, fwd_cnt=1000))
        more = q.received()
        assert sum(len(p.payload) for p in more if p.hdr.op == Op.RW) == 1000
        sock.close()


def test_guest_overrunning_our_credit_is_reset(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        host = q.host_listener(1025)
        q.post_rx(16)
        q.send_packet(q.hdr(Op.REQUEST, dst_port=1025))
        assert q.received()[0].hdr.op == Op.RESPONSE
        conn, _ = host.accept()  # accepted but never read: our buffer fills
        q.host_sockets.append(conn)
        chunk = b"z" * 65536
        for _ in range(BUF_ALLOC // len(chunk) + 8):
            q.send_packet(q.hdr(Op.RW, dst_port=1025, length=len(chunk)), chunk)
        ops = [p.hdr.op for p in q.received(want=1)]
        assert Op.RST in ops
        conn.close()


@pytest.mark.parametrize(
    ("header_kw", "payload", "expect"),
    [
        ({"op": 99}, b"", "rst"),  # unknown op
        ({"op": Op.RW, "src_cid": 9}, b"", "drop"),  # spoofed source CID
        ({"op": Op.RW, "length": 500}, b"short", "rst"),  # length beyond the buffer
        ({"op": Op.RW}, b"", "rst"),  # data for a connection that does not exist
        ({"op": Op.RST}, b"", "drop"),  # never answer an RST
        ({"op": Op.REQUEST, "dst_cid": 5}, b"", "rst"),  # not addressed to the host
        ({"op": Op.REQUEST, "type_": 2}, b"", "rst"),  # seqpacket: not offered
    ],
    ids=["unknown-op", "wrong-cid", "length-beyond-buffer", "unknown-conn", "rst", "dst-not-host", "seqpacket"],
)
def test_malformed_packets_get_rst_or_are_dropped(
    tmp_path: Path, header_kw: dict[str, int], payload: bytes, expect: str
) -> None:
    with fake_qemu(tmp_path) as q:
        q.post_rx()
        kw = dict(header_kw)
        op = kw.pop("op")
        q.send_packet(q.hdr(op, dst_port=7000, **kw), payload, split=False)  # type: ignore[arg-type]
        got = q.received(timeout=1.0 if expect == "drop" else 5.0)
        if expect == "rst":
            assert [p.hdr.op for p in got] == [Op.RST]
        else:
            assert got == []
        assert q.tx.take_used()  # the TX buffer was returned either way
        assert_still_serving(q)


def test_descriptor_outside_guest_memory_is_dropped(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        q.post_rx()
        q.tx.add([(0x7_0000_0000, 44, False)])
        os.eventfd_write(q.kick[1], 1)
        deadline = time.monotonic() + 5
        used: list[tuple[int, int]] = []
        while not used and time.monotonic() < deadline:
            used = q.tx.take_used()
            time.sleep(0.01)
        assert used and used[0][1] == 0
        assert q.muxer.stats["bad_chain"] == 1
        assert_still_serving(q)


def assert_still_serving(q: FakeQemu) -> None:
    """The backend is alive and a well-formed REQUEST still gets its answer."""
    assert q.alive
    q.guest_port += 1
    q.send_packet(q.hdr(Op.REQUEST, dst_port=4321))
    assert [p.hdr.op for p in q.received()] == [Op.RST]  # nobody listens on 4321
    assert q.muxer.stats["internal_error"] == 0


def _stop_rings(q: FakeQemu) -> list[int]:
    """What QEMU does on pause or reset: disable, then GET_VRING_BASE each ring."""
    for i in (0, 1):
        q.send(m.Request.SET_VRING_ENABLE, struct.pack("<II", i, 0))
    bases = []
    for i in (0, 1):
        q.send(m.Request.GET_VRING_BASE, struct.pack("<II", i, 0))
        _req, flags, body = q.recv_reply()
        assert flags == 0x5
        bases.append(struct.unpack("<II", body)[1])
    return bases


def _restart_rings(q: FakeQemu, bases: list[int]) -> None:
    for i, drv in ((0, q.rx), (1, q.tx)):
        q.send(m.Request.SET_VRING_BASE, struct.pack("<II", i, bases[i]))
        q.send(m.Request.SET_VRING_ADDR, drv.addr_payload(i))
        q.send(m.Request.SET_VRING_KICK, struct.pack("<Q", i), [q.kick[i]])
    for i in (0, 1):
        q.send(m.Request.SET_VRING_ENABLE, struct.pack("<II", i, 1))


def _one_connection(q: FakeQemu, port: int) -> socket.socket:
    host = q.host_listener(port)
    q.post_rx()
    q.send_packet(q.hdr(Op.REQUEST, dst_port=port))
    q.received()
    conn, _ = host.accept()
    q.host_sockets.append(conn)
    conn.settimeout(5)
    return conn


def test_pause_and_resume_keep_connections(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        conn = _one_connection(q, 1026)
        bases = _stop_rings(q)  # a paused VM
        assert bases[1] > 0 and q.muxer.conns
        _restart_rings(q, bases)  # resumed where it stopped
        q.send_packet(q.hdr(Op.RW, dst_port=1026, length=5), b"still")
        assert conn.recv(10) == b"still"


def test_driver_reset_closes_every_connection(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        conn = _one_connection(q, 1026)
        _stop_rings(q)
        q.rx.reset()
        q.tx.reset()
        _restart_rings(q, [0, 0])  # the driver started over: rings from 0
        assert conn.recv(10) == b""  # the host side sees the connection end
        assert q.muxer.conns == {}


def test_shutdown_both_ways_from_the_guest_gets_rst(tmp_path: Path) -> None:
    with fake_qemu(tmp_path) as q:
        host = q.host_listener(1027)
        q.post_rx()
        q.send_packet(q.hdr(Op.REQUEST, dst_port=1027))
        q.received()
        conn, _ = host.accept()
        q.host_sockets.append(conn)
        q.send_packet(q.hdr(Op.RW, dst_port=1027, length=3), b"bye")
        q.send_packet(q.hdr(Op.SHUTDOWN, dst_port=1027, flags=SHUTDOWN_RCV | SHUTDOWN_SEND))
        assert [p.hdr.op for p in q.received()] == [Op.RST]
        conn.settimeout(5)
        assert conn.recv(10) == b"bye" and conn.recv(10) == b""  # data first, then EOF
