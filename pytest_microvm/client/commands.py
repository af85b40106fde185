"""Commands in the guest, run over a :class:`~.connection.Connection`.

Owns what a job means when it is a command: the EXEC frame built from argv, env, cwd and
timeout; :func:`run` to completion; :func:`start` and the :class:`Process` handle that
streams a running command's input and output; the result; and the other requests that
act on the guest as a whole (the no-op :func:`probe`, :func:`poweroff`, and the CLONE
sent by :func:`become_clone`). :class:`~pytest_microvm.client.AgentClient` is the public
face of these functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal as _signal
import time
from collections.abc import Mapping, Sequence

from pytest_microvm import _wait
from pytest_microvm import protocol as p
from pytest_microvm.client.connection import Connection, Job, Sink
from pytest_microvm.errors import CommandError, CommandTimeout, MicroVMError, ProtocolError
from pytest_microvm.result import CommandResult

PROBE_ARGV = ("/bin/sh", "-c", ":")
# How long past a command's own timeout the host waits for the agent's EXIT before it
# concludes the agent is wedged: the agent kills at the deadline, so EXIT is normally
# a round-trip away; TCG guests under load need some slack.
_TIMEOUT_GRACE = 10.0

Command = str | Sequence[str]


def _argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv:
        raise ValueError("command must not be empty")
    return argv


def _start(
    conn: Connection,
    argv: list[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bool,
    timeout: float | None,
    sink: Sink | None,
    pty: tuple[int, int] | None = None,
    user: str | None = None,
) -> Job:
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    for key in env or {}:
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name: {key!r}")
    p.check_user(user or "")
    env_list = [f"{k}={v}" for k, v in (env or {}).items()]
    timeout_ms = 0 if timeout is None else max(1, math.ceil(timeout * 1000))
    return conn.open_job(
        argv,
        sink,
        lambda fid: p.encode_exec(
            fid, argv, env=env_list, cwd=cwd or "", stdin_pipe=stdin, pty=pty, timeout_ms=timeout_ms, user=user or ""
        ),
    )


def _abandon(conn: Connection, job: Job) -> None:
    # The host gave up waiting: make sure the command does not outlive that in the guest.
    with contextlib.suppress(MicroVMError):
        conn.send(p.encode_u32(p.FrameType.KILL, job.id, _signal.SIGKILL))


def _result(job: Job, stdout: bytes, stderr: bytes) -> CommandResult:
    job.raise_if_failed()
    assert job.exit is not None
    return CommandResult(
        argv=tuple(job.argv),
        stdout=stdout,
        stderr=stderr,
        exit_code=job.exit.exit_code,
        signal=job.exit.signal,
        timed_out=job.exit.timed_out,
        duration=job.finished - job.started,
    )


def start(
    conn: Connection,
    cmd: Command,
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bool,
    timeout: float | None,
    pty: tuple[int, int] | None,
    user: str | None = None,
) -> Process:
    """Start a command with its output queued for the returned :class:`Process` to read."""
    argv = _argv(cmd)
    job = _start(conn, argv, env, cwd, stdin or pty is not None, timeout, sink=None, pty=pty, user=user)
    return Process(conn, job, timeout)


def run(
    conn: Connection,
    cmd: Command,
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    timeout: float | None,
    check: bool,
    user: str | None = None,
) -> CommandResult:
    """Run a command to completion, collecting its output as it arrives."""
    argv = _argv(cmd)
    out, err = bytearray(), bytearray()

    def collect(ftype: p.FrameType, data: bytes) -> None:
        (out if ftype is p.FrameType.STDOUT else err).extend(data)

    job = _start(conn, argv, env, cwd, stdin is not None, timeout, sink=collect, user=user)
    try:
        if stdin is not None:
            conn.send_stdin(job, stdin)
            conn.close_stdin(job)
        conn.wait(job, None if timeout is None else timeout + _TIMEOUT_GRACE)
    except CommandTimeout:
        _abandon(conn, job)
        raise
    result = _result(job, bytes(out), bytes(err))
    if check and not result.ok:
        raise CommandError(result)
    return result


def probe(conn: Connection, timeout: float) -> float:
    """Run :data:`PROBE_ARGV`; its round-trip time, or ProtocolError unless exit 0 and silent."""
    result = run(conn, list(PROBE_ARGV), env=None, cwd=None, stdin=None, timeout=timeout, check=False)
    if not result.ok or result.stdout or result.stderr:
        raise ProtocolError(f"probe failed: {result.describe()}, stdout={result.stdout[:200]!r}")
    return result.duration


def become_clone(conn: Connection, token: str) -> None:
    """Send CLONE with the host's clock now, 64 bytes of fresh entropy and ``token``."""
    conn.send(p.encode_clone(time.time_ns(), token, os.urandom(64)))


def poweroff(conn: Connection, timeout: float) -> None:
    """Send POWEROFF; wait up to ``timeout`` for the agent to close the connection."""
    conn.send(p.frame(p.FrameType.POWEROFF, 0))
    _wait.join(conn.reader, timeout)


class Process:
    """A running command: feed its stdin, read its output as it comes, kill it, wait for it."""

    def __init__(self, conn: Connection, job: Job, timeout: float | None) -> None:
        self._conn = conn
        self._job = job
        self._timeout = timeout
        self.argv = tuple(job.argv)

    @property
    def done(self) -> bool:
        """True once the agent reported the end of the command (output may remain unread)."""
        return self._conn.finished(self._job)

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send bytes to the command's stdin (needs ``start(..., stdin=True)``).

        Blocks while the command is not reading (credit exhausted); ``timeout`` bounds that.
        """
        self._conn.send_stdin(self._job, data, timeout)

    def close_stdin(self) -> None:
        """Signal end of input to the command."""
        self._conn.close_stdin(self._job)

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a command started with ``pty=`` (it gets SIGWINCH)."""
        if self._conn.finished(self._job):
            return
        self._conn.send(p.encode_winsize(self._job.id, rows, cols))

    def kill(self, sig: int = _signal.SIGKILL) -> None:
        """Send a signal to the command's process group in the guest."""
        if self._conn.finished(self._job):
            return
        self._conn.send(p.encode_u32(p.FrameType.KILL, self._job.id, int(sig)))

    def read(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """Next chunk of output as ``("stdout" | "stderr", data)``; None once output ended.

        Raises CommandTimeout if nothing arrives within ``timeout`` seconds.
        """
        chunk = self._conn.take_output(self._job, timeout)
        if chunk is None:
            return None
        ftype, data = chunk
        return ("stdout" if ftype is p.FrameType.STDOUT else "stderr", data)

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for the end and return the result, holding the output not yet ``read()``."""
        if timeout is None and self._timeout is not None:
            timeout = self._timeout + _TIMEOUT_GRACE
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                chunk = self.read(remaining)
            except CommandTimeout:
                _abandon(self._conn, self._job)
                raise
            if chunk is None:
                break
            (out if chunk[0] == "stdout" else err).extend(chunk[1])
        return _result(self._job, bytes(out), bytes(err))
