"""Monitor (QMP through qemu.qmp) against a fake QMP server on a Unix socket: no QEMU."""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_microvm.machine.qmp import Monitor, MonitorError


@pytest.fixture
def qmp_server(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """Makes servers that speak just enough QMP: the greeting, then {"return": ...} per
    command. One per Monitor: closing a Monitor removes its socket file, as with QEMU's."""
    servers: list[socket.socket] = []

    def serve(server: socket.socket) -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, '
                         b'"capabilities": []}}\r\n')  # fmt: skip
            buffer, decoder = "", json.JSONDecoder()
            while data := conn.recv(4096):  # a stream of JSON objects, not lines
                buffer += data.decode()
                while buffer.strip():
                    try:
                        request, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break
                    buffer = buffer.lstrip()[end:]
                    answer = {"status": "running"} if request["execute"] == "query-status" else {}
                    reply: dict[str, object] = {"return": answer}
                    if "id" in request:
                        reply["id"] = request["id"]
                    conn.sendall(json.dumps(reply).encode() + b"\r\n")

    def make() -> Path:
        path = tmp_path / f"qmp{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen()
        servers.append(server)
        threading.Thread(target=serve, args=(server,), daemon=True).start()
        return path

    yield make
    for server in servers:
        server.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_monitor_used_from_a_worker_thread_leaves_no_event_loop_behind(qmp_server: Callable[[], Path]) -> None:
    statuses: list[str] = []
    paths = [qmp_server() for _ in range(4)]

    def use_once() -> None:
        monitor = Monitor(paths[len(statuses)])
        monitor.connect()
        statuses.append(monitor.status())
        monitor.close()

    use_once()  # the main thread's loop (made on demand, kept for the process) is not counted
    gc.collect()
    before = _open_fds()
    for _ in range(3):  # each in a fresh thread, as VMs booted from a thread pool would be
        worker = threading.Thread(target=use_once)
        worker.start()
        worker.join(30)
    gc.collect()
    assert statuses == ["running"] * 4
    assert _open_fds() == before  # no epoll fd or self-pipe per thread


def test_an_unreachable_monitor_is_a_monitor_error(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            Monitor(tmp_path / "nobody.sock").connect()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    before = _open_fds()
    worker = threading.Thread(target=connect)
    worker.start()
    worker.join(30)
    gc.collect()
    assert len(errors) == 1 and isinstance(errors[0], MonitorError)
    assert _open_fds() == before
