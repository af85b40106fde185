"""AgentClient: runs commands and moves files through a connected agent.

Owns one connected stream socket (vsock, Unix, or a userspace backend's socket — it does
not care which) after the HELLO handshake. A reader thread demultiplexes incoming frames
to jobs, so many commands can run at once from many threads. Memory stays bounded per
job through the credit scheme of docs/protocol.md: a streaming :class:`Process` only
returns credit as its user reads, so an unread command stalls in the guest instead of
filling host memory.

This module is the public face: :class:`AgentClient` holds a connection and delegates to
three modules, each with one job —

- :mod:`.connection`: the socket, the handshake, the reader thread and the dispatch of
  frames to jobs, the credit windows, close
- :mod:`.commands`: commands (run, start and :class:`Process`), probe, poweroff, clone
- :mod:`.files`: file transfer (PUT and GET)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from pytest_microvm import _logging
from pytest_microvm import protocol as p
from pytest_microvm.client import commands, connection, files
from pytest_microvm.client.commands import PROBE_ARGV, Command, Process
from pytest_microvm.client.connection import Sink
from pytest_microvm.errors import CommandTimeout, MicroVMError
from pytest_microvm.result import CommandResult

if TYPE_CHECKING:
    from pytest_microvm.channel.base import Listener

__all__ = ["HELLO_WAIT", "PROBE_ARGV", "AgentClient", "Command", "Process", "Sink", "connect_agent", "summarize"]
log = _logging.logger(__name__)

# How long one accepted connection may take to say HELLO before the next is taken: the
# agent says it at once, and a connection its guest gave up on (a connect that timed out
# there while the backend had already reached us) stays silent and would hold the wait.
HELLO_WAIT = 5.0


class AgentClient:
    """A handshaken connection to one agent. Thread-safe; use as a context manager."""

    def __init__(self, sock: socket.socket, hello: p.Hello, *, name: str = "agent") -> None:
        """Wrap a socket whose HELLO was already accepted; prefer :meth:`handshake`."""
        self.hello = hello
        self._conn = connection.Connection(sock, name=name)

    # ---- setup and teardown ----------------------------------------------------

    @classmethod
    def handshake(cls, sock: socket.socket, *, token: str, timeout: float, name: str = "agent") -> AgentClient:
        """Read the agent's HELLO, check version and token, answer HELLO_ACK.

        On any mismatch the socket is closed without a reply and HandshakeError raised.
        """
        hello = connection.handshake(sock, token=token, timeout=timeout)
        return cls(sock, hello, name=name)

    def close(self) -> None:
        """Close the connection; jobs still waiting fail with ConnectionLost."""
        self._conn.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._conn.connected

    @property
    def _reader(self) -> threading.Thread:
        # The tests join the reader thread to prove a broken connection really ends it.
        return self._conn.reader

    # ---- commands ----------------------------------------------------------------

    def start(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        pty: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> Process:
        """Start a command and return a handle to stream its input and output.

        ``cmd`` is an argv list, or a string run by ``/bin/sh -c``. ``stdin=True`` gives
        the command a pipe fed by :meth:`Process.write`; otherwise it reads /dev/null.
        ``timeout`` (seconds) is enforced by the agent, which kills the process group.
        ``pty=(rows, cols)`` runs it on a new pseudo-terminal of that size (its
        controlling terminal: job control and ^C work; all output arrives as stdout).
        ``user``: run it as ``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID`` of the guest
        (``docker run --user``; names from the guest's /etc/passwd and /etc/group).
        """
        return commands.start(self._conn, cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, pty=pty, user=user)

    def run(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        user: str | None = None,
    ) -> CommandResult:
        """Run a command to completion and return its stdout, stderr and exit status.

        ``stdin`` bytes are streamed to the command, then its input is closed. ``user``: as
        for :meth:`start`.
        With ``check=True`` a command that does not exit 0 raises :class:`CommandError`.
        Raises :class:`AgentError` if the command cannot be started (e.g. not found).
        """
        return commands.run(self._conn, cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, check=check, user=user)

    def probe(self, timeout: float = 30.0) -> float:
        """Run the no-op probe through the whole exec path; return its round-trip time.

        Raises ProtocolError if the agent answers anything but exit 0 with no output.
        """
        return commands.probe(self._conn, timeout)

    # ---- files -------------------------------------------------------------------

    def write_file(
        self, remote: str, data: bytes | BinaryIO, *, mode: int = 0o644, timeout: float | None = None
    ) -> None:
        """Create or replace the guest file ``remote`` with ``data`` (bytes or a binary file)."""
        files.write_file(self._conn, remote, data, mode=mode, timeout=timeout)

    def put_file(self, local: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> None:
        """Copy a host file into the guest, keeping its permission bits unless ``mode`` is given."""
        files.put_file(self._conn, local, remote, mode=mode)

    def read_file(self, remote: str, *, timeout: float | None = None) -> bytes:
        """Return the content of a guest file."""
        return files.read_file(self._conn, remote, timeout=timeout)

    def get_file(self, remote: str, local: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        """Copy a guest file to the host path ``local`` (which the host, not the guest, names).

        Streams to disk with bounded memory; returns the number of bytes written. On
        failure the partial file is removed.
        """
        return files.get_file(self._conn, remote, local, timeout=timeout)

    # ---- clones --------------------------------------------------------------------

    def become_clone(self, token: str) -> None:
        """Send CLONE: the guest takes the host's clock now, fresh entropy and ``token``.

        Frames are handled in order, so a command sent after this runs in a guest that
        has applied it; an agent that could not apply it closes the connection, and that
        command fails with the agent's reason.
        """
        commands.become_clone(self._conn, token)

    # ---- power -------------------------------------------------------------------

    def poweroff(self, timeout: float = 10.0) -> None:
        """Ask the agent to power the guest off (exit, on the host); wait for the close."""
        commands.poweroff(self._conn, timeout)


def connect_agent(
    listener: Listener,
    *,
    token: str,
    timeout: float,
    name: str = "agent",
    watch: Callable[[], None] = lambda: None,
    refused: list[str] | None = None,
) -> AgentClient:
    """Accept the agent's connection on ``listener`` and complete the handshake.

    A connection that says nothing for HELLO_WAIT, or the wrong thing (a wrong token: not
    the guest we booted), is dropped and the next one taken: the agent retries at once.
    ``watch`` runs between short waits and may raise (QEMU died). Why connections were
    turned away (here, and by the listener: a wrong CID) is appended to ``refused``.
    CommandTimeout if no agent completes the handshake within ``timeout`` seconds.
    """
    reasons = [] if refused is None else refused
    deadline = time.monotonic() + timeout
    seen = len(listener.refused)
    while True:
        watch()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = f" (turned away: {summarize(reasons)})" if reasons else ""
            raise CommandTimeout(f"no agent connected within {timeout:g}s{why}")
        try:
            sock = listener.accept(min(0.2, remaining))
        except CommandTimeout:
            continue
        finally:
            reasons += listener.refused[seen:]
            seen = len(listener.refused)
        try:
            return AgentClient.handshake(
                sock, token=token, timeout=min(HELLO_WAIT, max(0.5, deadline - time.monotonic())), name=name
            )
        except MicroVMError as exc:
            log.warning("%s: turned away an agent connection: %s", name, exc)
            reasons.append(str(exc))


def summarize(reasons: list[str]) -> str:
    """Reasons in the order first seen, each once with its count: an agent retries every 10 ms."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(r if n == 1 else f"{r} (x{n})" for r, n in counts.items())
