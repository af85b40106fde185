"""The host end of the userspace vsock flavour: the backend process and its sockets.

One backend process per VM (:mod:`pytest_microvm.channel.vhost_user`), forked by this
process's fork server or an interpreter of its own (:mod:`.backends`). The host side of
guest port P is the Unix socket ``<uds>_<P>``; the host reaches guest port P by
connecting to ``<uds>`` and saying ``CONNECT P``. Each VM has a CID space of its own
(the guest is CID 3), so only this VM's guest reaches its sockets through the backend.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from pytest_microvm import _wait
from pytest_microvm.channel.backends import BackendError, BackendProcess, start_backend
from pytest_microvm.channel.base import Channel, bind_free, refused, unanswered
from pytest_microvm.channel.unix import UnixListener
from pytest_microvm.errors import ConnectionLost

__all__ = ["GUEST_CID", "BackendError", "UserspaceVsock"]

GUEST_CID = 3  # every VM has its own CID space behind its own backend


class UserspaceVsock(Channel):
    """Starts and stops the vhost-user-vsock backend for one guest."""

    flavour = "userspace"
    shared_memory = True  # the backend maps guest RAM

    def __init__(self, workdir: Path, guest_cid: int = GUEST_CID, *, die_with_parent: bool = True) -> None:
        self.workdir = workdir
        self.die_with_parent = die_with_parent
        self.guest_cid = guest_cid
        self.control_path = workdir / "vhost-user-vsock.sock"
        self.uds_path = workdir / "vsock"
        self.stderr_path = workdir / "vsock-backend.log"
        self._backend: BackendProcess | None = None

    def start(self) -> None:
        # Listen here and hand the socket over: QEMU may connect the moment we return,
        # with no window in which the path does not exist yet.
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            control.bind(str(self.control_path))
            control.listen(1)
            with self.stderr_path.open("wb") as err:
                self._backend = start_backend(
                    control, err, str(self.uds_path), self.guest_cid, die_with_parent=self.die_with_parent
                )
        finally:
            control.close()
        # Not waiting for the backend here: QEMU's connection waits in the socket's
        # backlog and its first request is answered once the backend is up, so the
        # backend's start-up overlaps QEMU's. Only a host-side connect() needs it up
        # (_await_started).

    def _await_started(self, timeout: float = 10.0) -> None:
        def up() -> bool | None:
            self.check_alive()
            return self.uds_path.exists() or None  # bound by the backend once it is up

        if _wait.until(up, time.monotonic() + timeout, 0.005) is None:
            raise BackendError(f"the vsock backend did not start within {timeout:.0f}s:\n{self.stderr_tail()}")

    @property
    def pid(self) -> int | None:
        return self._backend.pid if self._backend else None

    @property
    def pids(self) -> list[int]:
        return [self._backend.pid] if self._backend else []

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            return self.stderr_path.read_bytes()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        ended = self._backend.exited() if self._backend is not None else None
        if ended is not None:
            raise BackendError(f"the vsock backend (pid {self.pid}) {ended}:\n{self.stderr_tail()}")

    def qemu_args(self) -> list[str]:
        """The socket QEMU reaches the backend through; the device may be plugged in later."""
        return ["-chardev", f"socket,id=vsock,path={self.control_path}"]

    def device(self) -> tuple[str, dict[str, str]]:
        return "vhost-user-vsock-pci", {"chardev": "vsock"}

    def listen(self, port: int | None = None) -> UnixListener:
        """Where the guest's connections to CID 2 port ``listener.port`` arrive."""
        return bind_free(lambda p: UnixListener(f"{self.uds_path}_{p}", backlog=128, port=p), port)

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """CONNECT through the backend; ConnectionLost if the guest refuses, CommandTimeout if silent."""
        self._await_started(max(timeout, 10.0))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.uds_path))
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                b = sock.recv(1)
                if not b:
                    raise refused(port)
                line += b
            if not line.startswith(b"OK "):
                raise ConnectionLost(f"unexpected answer to CONNECT {port}: {line!r}")
        except TimeoutError:
            sock.close()
            raise unanswered(port, timeout) from None
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def state(self) -> dict[str, Any]:
        return {"guest_cid": self.guest_cid, "uds": str(self.uds_path), "backend_pid": self.pid}

    def stop(self, grace: float = 2.0) -> None:
        if self._backend is not None:
            self._backend.stop(grace)

    def __enter__(self) -> UserspaceVsock:
        self.start()
        return self
