"""A Unix-socket listener for agent connections, and the accept-then-handshake step."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType

from pytest_microvm.client import AgentClient
from pytest_microvm.errors import CommandTimeout, MicroVMError


class UnixListener:
    """Listens on a Unix socket path; removes the path when closed."""

    def __init__(self, path: str | os.PathLike[str], backlog: int = 8) -> None:
        self.path = Path(path)
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
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError:
            raise CommandTimeout(f"no agent connected to {self.path} within {timeout}s") from None
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


# How long one accepted connection may take to say HELLO before the next is taken: the
# agent says it at once, and a connection its guest gave up on (a connect that timed out
# there while the backend had already reached us) stays silent and would hold the wait.
HELLO_WAIT = 5.0


def connect_agent(listener: UnixListener, *, token: str, timeout: float, name: str = "agent") -> AgentClient:
    """Accept the agent's connection and complete the handshake within ``timeout`` seconds.

    A connection that says nothing for HELLO_WAIT, or the wrong thing, is dropped and the
    next one taken: the agent retries at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = listener.accept(max(0.1, deadline - time.monotonic()))
        try:
            return AgentClient.handshake(
                sock, token=token, timeout=min(HELLO_WAIT, max(0.1, deadline - time.monotonic())), name=name
            )
        except MicroVMError:
            if time.monotonic() >= deadline:
                raise
