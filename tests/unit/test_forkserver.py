"""The fork server with fakes standing in for QEMU: one real server process, its forked
backends, and FakeQemu speaking vhost-user to each. Not an integration test: no VM runs.
Real guests on one server: tests/integration/test_userspace_vsock.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from pytest_microvm.channel.backends import BackendError, ForkedBackend, ForkServer
from pytest_microvm.channel.vhost_user import messages as m
from pytest_microvm.channel.vhost_user.vsock import Op
from tests.agent_harness import children_of, processes_mentioning
from tests.vhost_fake import FakeQemu


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return True  # ended; its parent has not reaped it yet
        time.sleep(0.02)
    return False


@pytest.fixture
def server() -> Iterator[ForkServer]:
    s = ForkServer()
    try:
        yield s
    finally:
        s.close()


@contextmanager
def backend_for(server: ForkServer, workdir: Path) -> Iterator[tuple[ForkedBackend, FakeQemu]]:
    """A backend forked by ``server`` for a VM in ``workdir``, with a FakeQemu connected."""
    workdir.mkdir()
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(workdir / "control"))
    control.listen(1)
    try:
        with (workdir / "backend.log").open("wb") as log:
            backend = server.fork(control, log, str(workdir / "vsock"), 3)
    finally:
        control.close()
    q = FakeQemu(workdir, control=workdir / "control")
    try:
        q.setup()
        yield backend, q
    finally:
        q.stop()
        backend.stop(2.0)


def _connection(q: FakeQemu, port: int) -> socket.socket:
    host = q.host_listener(port)
    q.post_rx()
    q.send_packet(q.hdr(Op.REQUEST, dst_port=port))
    assert [p.hdr.op for p in q.received()] == [Op.RESPONSE]
    conn, _ = host.accept()
    q.host_sockets.append(conn)
    conn.settimeout(5)
    return conn


def _exchange(q: FakeQemu, conn: socket.socket, port: int, data: bytes) -> None:
    """``data`` guest to host and back again, byte for byte."""
    q.send_packet(q.hdr(Op.RW, dst_port=port, length=len(data)), data)
    got = b""
    while len(got) < len(data):
        got += conn.recv(len(data) - len(got))
    assert got == data
    conn.sendall(data)
    back = b"".join(p.payload for p in q.received(want=1))
    assert back == data


def test_one_backend_failing_leaves_the_others_byte_exact(server: ForkServer, tmp_path: Path) -> None:
    with ExitStack() as stack:
        vms = [stack.enter_context(backend_for(server, tmp_path / f"vm{i}")) for i in range(3)]
        conns = [_connection(q, 1024) for _b, q in vms]
        assert len({b.pid for b, _q in vms}) == 3  # a process per VM
        for i, (b, _q) in enumerate(vms):  # each holds its own VM's files, not the others'
            assert set(processes_mentioning(str(tmp_path / f"vm{i}"))) == {b.pid, server.pid}

        # VM 0's "QEMU" sends a header announcing an oversized payload: its device fails...
        (bad, bad_q), *good = vms
        bad_q.qemu_end.sendall(m.HEADER.pack(m.Request.SET_FEATURES, 1, m.MAX_PAYLOAD + 1))
        deadline = time.monotonic() + 10
        while bad.exited() is None:
            assert time.monotonic() < deadline, "the backend given a bad message kept running"
            time.sleep(0.02)
        assert bad.exited() == "exited with status 1"
        assert "payload" in (tmp_path / "vm0" / "backend.log").read_text()

        # ... and a guest in VM 1 sends a descriptor outside its memory: dropped, not fatal.
        good[0][1].tx.add([(0x7_0000_0000, 44, False)])
        os.eventfd_write(good[0][1].kick[1], 1)

        # The other VMs' connections, opened before, carry bytes exactly, and a new VM still comes.
        for (b, q), conn in zip(good, conns[1:], strict=True):
            assert b.exited() is None
            _exchange(q, conn, 1024, os.urandom(1000))
        with backend_for(server, tmp_path / "vm3") as (late, late_q):
            _exchange(late_q, _connection(late_q, 1024), 1024, b"after")
            assert late.exited() is None


def test_a_killed_backend_says_how_it_ended(server: ForkServer, tmp_path: Path) -> None:
    with backend_for(server, tmp_path / "vm") as (backend, _q):
        os.kill(backend.pid, signal.SIGKILL)
        assert _gone(backend.pid)
        assert backend.exited() == "killed by signal 9 (SIGKILL)"


def test_a_dead_server_is_replaced_and_its_backends_end_with_it(server: ForkServer, tmp_path: Path) -> None:
    with backend_for(server, tmp_path / "a") as (first, _q):
        old = server.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        assert _gone(first.pid)  # PR_SET_PDEATHSIG: a backend never outlives its server
        with backend_for(server, tmp_path / "b") as (second, q):
            assert server.pid not in (None, old)
            _exchange(q, _connection(q, 1024), 1024, b"new server")
            assert second.exited() is None


def test_bad_requests_get_an_error_and_the_server_keeps_serving(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-m", "pytest_microvm.channel.vhost_user.forkserver"]
    proc = subprocess.Popen([*argv, "--socket-fd", str(theirs.fileno()), "--for-pid", str(os.getpid())],
                            pass_fds=[theirs.fileno()])  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(30)
        for request, fds in ((b"not json", []), (b'{"uds": "/x", "guest_cid": 2}', [0, 1]), (b"[1]", [])):
            socket.send_fds(ours, [request], fds)
            reply = json.loads(ours.recv(4096))
            assert "error" in reply and "pid" not in reply
        ours.close()  # end of file: the server exits
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_and_backends_end_when_their_process_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import socket, time
            from pytest_microvm.channel.backends import fork_server
            control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            control.bind({str(tmp_path / "control")!r})
            control.listen(1)
            with open({str(tmp_path / "log")!r}, "wb") as log:
                backend = fork_server().fork(control, log, {str(tmp_path / "vsock")!r}, 3)
            print(fork_server().pid, backend.pid, flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert parent.stdout is not None
    server_pid, backend_pid = map(int, parent.stdout.readline().split())
    parent.kill()  # SIGKILL: no atexit, no cleanup of ours runs
    parent.wait(10)
    parent.stdout.close()
    assert _gone(server_pid), "the fork server outlived the process it served"
    assert _gone(backend_pid), "a backend outlived the process it served"


def test_a_server_that_cannot_start_is_a_clear_error(
    server: ForkServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a server that exits at once
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(tmp_path / "control"))
    control.listen(1)
    with (tmp_path / "log").open("wb") as log, pytest.raises(BackendError, match="fork server failed twice"):
        server.fork(control, log, str(tmp_path / "vsock"), 3)
    control.close()


def test_a_slow_server_is_not_killed_and_its_late_answer_is_not_taken_for_the_next(
    server: ForkServer, tmp_path: Path
) -> None:
    with backend_for(server, tmp_path / "running") as (running, q):
        pid = server.pid
        assert pid is not None
        server.answer_timeout = 0.5
        os.kill(pid, signal.SIGSTOP)  # a server that cannot answer for now
        try:
            with (
                pytest.raises(BackendError, match=r"did not answer within 0\.5 s"),
                backend_for(server, tmp_path / "x"),
            ):
                pass
        finally:
            os.kill(pid, signal.SIGCONT)
        server.answer_timeout = 30.0
        # Its late answer (a backend forked for nobody) is passed over, and that backend ends.
        with backend_for(server, tmp_path / "next") as (following, next_q):
            assert server.pid == pid  # the same server: a slow one is not replaced
            _exchange(next_q, _connection(next_q, 1024), 1024, b"its own answer")
            _exchange(q, _connection(q, 2048), 2048, b"still served")  # the running VM lost nothing
            assert following.exited() is None and running.exited() is None
        orphans = [c for c in children_of(pid) if c not in (running.pid,)]
        deadline = time.monotonic() + 10
        while orphans and time.monotonic() < deadline:
            time.sleep(0.05)
            orphans = [c for c in children_of(pid) if c not in (running.pid,)]
        assert orphans == [], "the backend forked for the request that gave up still runs"
