"""The backend as a process: its command line, dying with its parent, answering QEMU under load."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from pytest_microvm.channel.vhost_user import messages as m
from pytest_microvm.channel.vhost_user.vsock import Op
from tests.vhost_fake import fake_qemu

MODULE = [sys.executable, "-m", "pytest_microvm.channel.vhost_user"]


def test_cli_refuses_reserved_cids(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*MODULE, "--socket", str(tmp_path / "s"), "--uds", str(tmp_path / "u"), "--guest-cid", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "reserved" in proc.stderr


def test_cli_gives_up_when_qemu_never_connects_and_cleans_up(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [
            *MODULE,
            "--socket",
            str(tmp_path / "s"),
            "--uds",
            str(tmp_path / "u"),
            "--guest-cid",
            "3",
            "--accept-timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "did not connect" in proc.stderr
    assert time.monotonic() - start < 15
    assert list(tmp_path.iterdir()) == []  # both socket paths removed


def test_backend_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    # A parent that starts the backend and reports its pid, then is killed outright.
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from pytest_microvm.channel.userspace import UserspaceVsock
            vs = UserspaceVsock(Path({str(tmp_path)!r}), guest_cid=3)
            vs.start()
            print(vs.pid, flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    backend_pid = int(parent.stdout.readline())
    os.kill(backend_pid, 0)  # running
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(backend_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(backend_pid, signal.SIGKILL)
    raise AssertionError("the backend outlived its parent")


def test_get_vring_base_is_answered_at_once_while_data_flows(tmp_path: Path) -> None:
    """QEMU waits for GET_VRING_BASE synchronously (pause, reset): data work must not delay it."""
    with fake_qemu(tmp_path) as q:
        host = q.host_listener(1030)
        q.post_rx(16)
        q.send_packet(q.hdr(Op.REQUEST, dst_port=1030, buf_alloc=1 << 30))
        q.received()
        conn, _ = host.accept()
        q.host_sockets.append(conn)
        stop = threading.Event()

        def flood() -> None:  # host → guest as fast as the backend takes it
            block = b"y" * 65536
            while not stop.is_set():
                try:
                    conn.send(block)
                except OSError:
                    return

        def guest() -> None:  # consume and refill RX buffers so the backend is never idle
            while not stop.is_set():
                q.received(timeout=0.2)

        threads = [threading.Thread(target=flood, daemon=True), threading.Thread(target=guest, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        try:
            worst = 0.0
            for _ in range(20):
                start = time.monotonic()
                q.send(m.Request.GET_QUEUE_NUM, b"")
                assert q.recv_reply(timeout=5)[0] == m.Request.GET_QUEUE_NUM
                worst = max(worst, time.monotonic() - start)
            assert q.muxer.bytes_to_guest > 1 << 20  # data really was flowing
            assert worst < 0.5, f"a control message waited {worst:.3f}s behind data work"
        finally:
            stop.set()
            conn.shutdown(socket.SHUT_RDWR)
            for t in threads:
                t.join(5)
        q.send(m.Request.GET_VRING_BASE, struct.pack("<II", 0, 0))
        assert q.recv_reply()[1] == 0x5
