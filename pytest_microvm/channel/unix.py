"""A Unix-socket listener: the userspace backend's ``<uds>_<port>``, and the agent on the host in tests."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from pytest_microvm import _wait
from pytest_microvm.errors import CommandTimeout


class UnixListener:
    """Listens on a Unix socket path; removes the path when closed.

    ``port``: the vsock port it stands for (the userspace backend's ``<uds>_<port>``), if any.
    """

    def __init__(self, path: str | os.PathLike[str], backlog: int = 8, *, port: int = 0) -> None:
        self.path = Path(path)
        self.port = port
        self.refused: list[str] = []  # a Unix socket cannot tell one peer from another
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(str(self.path))
            self._sock.listen(backlog)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, timeout: float | None) -> socket.socket:
        """Wait for one connection; raise CommandTimeout if none comes within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            self._sock.settimeout(max(0.001, _wait.slice_of(remaining)))  # in slices: see _wait
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    where = f"port {self.port}" if self.port else str(self.path)
                    raise CommandTimeout(f"no connection from the guest to {where} within {timeout}s") from None
                continue
            conn.settimeout(None)
            return conn

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> UnixListener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
