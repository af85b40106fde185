"""The userspace vsock backend with a real QEMU guest (TCG here): the agent's whole path.

One VM per module for the data tests; the reboot and backend-kill tests boot their own
because they break the VM on purpose.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import ConnectionLost, GuestImage
from pytest_microvm.channel.userspace import BackendError
from pytest_microvm.machine import HostReport
from tests.integration.vsock_vm import VsockVM, vsock_vm

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def vm(microvm_image: GuestImage, host: HostReport, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VsockVM]:
    with vsock_vm(microvm_image, host, tmp_path_factory.mktemp("vsock"), memory_mib=512) as v:
        yield v


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def connect_when_listening(vm: VsockVM, port: int, timeout: float = 30.0) -> socket.socket:
    """CONNECT to a guest port, retrying while the guest listener is not up yet (RST)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return vm.vsock.connect(port)
        except ConnectionLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_probe_round_trip_through_the_backend(vm: VsockVM) -> None:
    assert vm.client.probe() < 5
    r = vm.client.run(["cat", "/proc/1/comm"])
    assert r.stdout == b"init\n"


def test_64_mib_guest_to_host(vm: VsockVM) -> None:
    prep = vm.client.run("head -c 67108864 /dev/urandom > /tmp/g2h && sha256sum /tmp/g2h", timeout=120, check=True)
    guest_digest = prep.stdout.split()[0].decode()
    with vm.vsock.listen(5000) as listener:
        sender = vm.client.start(["sh", "-c", "microvm-agent --connect 2:5000 < /tmp/g2h"], timeout=120)
        conn = listener.accept(timeout=60)
        data = recv_all(conn)
        conn.close()
    assert sender.wait().exit_code == 0
    assert len(data) == 64 * MIB
    assert hashlib.sha256(data).hexdigest() == guest_digest
    vm.client.run(["rm", "/tmp/g2h"], check=True)


def test_64_mib_host_to_guest(vm: VsockVM) -> None:
    data = os.urandom(64 * MIB)
    receiver = vm.client.start(["sh", "-c", "microvm-agent --listen 5001 </dev/null | sha256sum"], timeout=120)
    sock = connect_when_listening(vm, 5001)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == b""  # the guest sent nothing back and closed
    sock.close()
    result = receiver.wait()
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


class EchoServer:
    """Host-side echo on <uds>_<port>: each guest connection gets its bytes back."""

    def __init__(self, vm: VsockVM, port: int) -> None:
        self.listener = vm.vsock.listen(port)
        self.count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn = self.listener.accept(timeout=0.2)
            except Exception:
                continue
            self.count += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.listener.close()


def test_200_sequential_guest_connections(vm: VsockVM) -> None:
    echo = EchoServer(vm, 5002)
    try:
        r = vm.client.run(
            'for i in $(seq 200); do echo "msg $i" | microvm-agent --connect 2:5002 || echo "FAIL $i"; done',
            timeout=300,
        )
    finally:
        echo.close()
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().splitlines() == [f"msg {i}" for i in range(1, 201)]
    assert echo.count == 200


def test_200_sequential_host_connections(vm: VsockVM) -> None:
    server = vm.client.start(["microvm-agent", "--echo", "5003"])
    try:
        for i in range(200):
            sock = connect_when_listening(vm, 5003) if i == 0 else vm.vsock.connect(5003)
            with sock:
                sock.sendall(f"hello {i}".encode())
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == f"hello {i}".encode()
    finally:
        server.kill()
        server.wait(timeout=30)


def test_16_concurrent_connections_each_way(vm: VsockVM) -> None:
    # Guest → host: 16 relays at once against the host echo server.
    echo = EchoServer(vm, 5004)
    try:
        r = vm.client.run(
            "for i in $(seq 16); do (head -c 200000 /dev/urandom > /tmp/c$i; "
            "microvm-agent --connect 2:5004 < /tmp/c$i | cmp - /tmp/c$i && echo ok$i) & done; wait",
            timeout=300,
        )
    finally:
        echo.close()
    assert sorted(r.stdout.decode().split()) == sorted(f"ok{i}" for i in range(1, 17)), r.stderr
    # Host → guest: 16 threads against the guest echo server.
    server = vm.client.start(["microvm-agent", "--echo", "5005"])
    connect_when_listening(vm, 5005).close()
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        payload = os.urandom(500_000)
        with vm.vsock.connect(5005) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(sock)
            sender.join()
        results[i] = got == payload

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    server.kill()
    server.wait(timeout=30)
    assert results == {i: True for i in range(16)}


def test_connection_to_a_port_nobody_listens_on_is_refused_at_once(vm: VsockVM) -> None:
    start = time.monotonic()
    r = vm.client.run(["microvm-agent", "--connect", "2:6999"], timeout=60)
    assert r.exit_code == 1 and b"Connection reset" in r.stderr
    start_host = time.monotonic()
    with pytest.raises(ConnectionLost, match="refused"):
        vm.vsock.connect(6999)
    # RST, not the guest's connect timeout (2 s by default in Linux vsock... or longer).
    assert time.monotonic() - start < 10 and time.monotonic() - start_host < 5


def test_guest_reboot_then_new_connection(microvm_image: GuestImage, host: HostReport, tmp_path: Path) -> None:
    with vsock_vm(microvm_image, host, tmp_path, no_reboot=False) as v:
        assert v.client.run(["echo", "before"]).stdout == b"before\n"
        boots_before = v.qemu.console().count("running as PID 1")
        v.client.start(["reboot", "-f"])
        v.reconnect()  # the driver resets, rings are set up again, the agent reconnects
        assert v.qemu.console().count("running as PID 1") == boots_before + 1
        assert v.client.run(["echo", "after"]).stdout == b"after\n"
        v.vsock.check_alive()


def test_backend_killed_mid_run_gives_a_clear_error(
    microvm_image: GuestImage, host: HostReport, tmp_path: Path
) -> None:
    with vsock_vm(microvm_image, host, tmp_path) as v:
        proc = v.client.start(["sleep", "60"])
        assert v.vsock.pid is not None
        os.kill(v.vsock.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            proc.wait(timeout=30)
        assert time.monotonic() - start < 10
        deadline = time.monotonic() + 5  # its sockets close a moment before it has ended
        with pytest.raises(BackendError, match=r"\(pid \d+\) killed by signal 9 \(SIGKILL\)"):
            while time.monotonic() < deadline:
                v.vsock.check_alive()
                time.sleep(0.01)
