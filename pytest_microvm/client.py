"""AgentClient: runs commands and moves files through a connected agent.

Owns one connected stream socket (vsock, Unix, or a userspace backend's socket — it does
not care which) after the HELLO handshake. A reader thread demultiplexes incoming frames
to jobs, so many commands can run at once from many threads. Memory stays bounded per
job through the credit scheme of docs/protocol.md: a streaming :class:`Process` only
returns credit as its user reads, so an unread command stalls in the guest instead of
filling host memory.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import logging
import math
import os
import shlex
import signal as _signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from pytest_microvm import protocol as p
from pytest_microvm.errors import (
    AgentError,
    CommandError,
    CommandTimeout,
    ConnectionLost,
    HandshakeError,
    MicroVMError,
    ProtocolError,
)
from pytest_microvm.result import CommandResult

log = logging.getLogger(__name__)

PROBE_ARGV = ("/bin/sh", "-c", ":")
# How long past a command's own timeout the host waits for the agent's EXIT before it
# concludes the agent is wedged: the agent kills at the deadline, so EXIT is normally
# a round-trip away; TCG guests under load need some slack.
_TIMEOUT_GRACE = 10.0

Command = str | Sequence[str]
Sink = Callable[[p.FrameType, bytes], None]


def _argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv:
        raise ValueError("command must not be empty")
    return argv


class _Job:
    """Host-side state of one job; guarded by the client's lock."""

    def __init__(self, fid: int, argv: Sequence[str], sink: Sink | None, cond: threading.Condition) -> None:
        self.id = fid
        self.argv = argv
        self.sink = sink
        self.cond = cond
        self.chunks: collections.deque[tuple[p.FrameType, bytes]] = collections.deque()
        self.out_outstanding = 0  # output bytes received and not yet credited back
        self.stdin_credit = p.STDIN_WINDOW
        self.exit: p.Exit | None = None
        self.error: p.ErrorInfo | None = None
        self.failure: MicroVMError | None = None
        self.started = time.monotonic()
        self.finished = 0.0

    @property
    def done(self) -> bool:
        return self.exit is not None or self.error is not None or self.failure is not None

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.error is not None:
            raise AgentError(self.error.code, self.error.message)


class AgentClient:
    """A handshaken connection to one agent. Thread-safe; use as a context manager."""

    def __init__(self, sock: socket.socket, hello: p.Hello, *, name: str = "agent") -> None:
        """Wrap a socket whose HELLO was already accepted; prefer :meth:`handshake`."""
        self._sock = sock
        self.hello = hello
        self._log = log.getChild(name)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._next_id = 1
        self._slots = threading.BoundedSemaphore(p.MAX_JOBS)
        self._broken: MicroVMError | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"microvm-{name}-reader", daemon=True)
        self._reader.start()

    # ---- setup and teardown ----------------------------------------------------

    @classmethod
    def handshake(cls, sock: socket.socket, *, token: str, timeout: float, name: str = "agent") -> AgentClient:
        """Read the agent's HELLO, check version and token, answer HELLO_ACK.

        On any mismatch the socket is closed without a reply and HandshakeError raised.
        """
        decoder = p.FrameDecoder()
        deadline = time.monotonic() + timeout
        try:
            frames: list[p.Frame] = []
            while not frames:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(f"agent connected but sent no HELLO within {timeout:.1f}s")
                sock.settimeout(remaining)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    raise ConnectionLost("agent closed the connection before HELLO")
                frames = decoder.feed(data)
            if frames[0].type is not p.FrameType.HELLO or len(frames) > 1:
                raise ProtocolError(f"expected HELLO first, got {frames[0].type.name}")
            hello = p.parse_hello(frames[0].payload)
            if hello.version != p.PROTOCOL_VERSION:
                raise HandshakeError(
                    f"agent {hello.agent_version} speaks protocol {hello.version}, this host speaks "
                    f"{p.PROTOCOL_VERSION}: rebuild the guest image (microvm image build)"
                )
            if not hmac.compare_digest(hello.token.encode(), token.encode()):
                raise HandshakeError("agent presented a wrong token: not the guest this host booted")
            sock.settimeout(None)
            sock.sendall(p.encode_hello_ack())
        except BaseException:
            sock.close()
            raise
        log.debug("handshake ok: agent %s", hello.agent_version)
        return cls(sock, hello, name=name)

    def close(self) -> None:
        """Close the connection; jobs still waiting fail with ConnectionLost."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._broken is None and not self._closed

    # ---- the wire ----------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise ConnectionLost(f"sending to the agent failed: {exc}") from exc

    def _read_loop(self) -> None:
        decoder = p.FrameDecoder()
        failure: MicroVMError
        try:
            while True:
                data = self._sock.recv(256 * 1024)
                if not data:
                    failure = ConnectionLost("the agent closed the connection")
                    break
                for f in decoder.feed(data):
                    self._dispatch(f)
        except MicroVMError as exc:
            failure = exc
            self._log.error("closing the connection: %s", exc)
        except OSError as exc:
            failure = ConnectionLost(f"connection to the agent failed: {exc}")
        with self._lock:
            if self._closed and isinstance(failure, ConnectionLost):
                failure = ConnectionLost("the client was closed")
            self._broken = failure
            for job in self._jobs.values():
                job.failure = failure
                job.cond.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _dispatch(self, f: p.Frame) -> None:
        self._log.debug("<- %s id=%d len=%d", f.type.name, f.id, len(f.payload))
        if f.type is p.FrameType.ERROR and f.id == 0:
            info = p.parse_error(f.payload)
            raise ProtocolError(f"agent reported a connection error: {info.message} (errno {info.code})")
        if f.type is p.FrameType.HELLO:
            raise ProtocolError("HELLO after the handshake")
        credit = 0
        with self._lock:
            job = self._jobs.get(f.id)
            if job is None:
                if f.type is p.FrameType.CREDIT:
                    return  # raced with the job's end; the spec says ignore
                raise ProtocolError(f"{f.type.name} for unknown job id {f.id}")
            if f.type in (p.FrameType.STDOUT, p.FrameType.STDERR):
                n = len(f.payload)
                if not 0 < n <= p.MAX_CHUNK:
                    raise ProtocolError(f"{f.type.name} chunk of {n} bytes (allowed 1..{p.MAX_CHUNK})")
                if job.out_outstanding + n > p.OUTPUT_WINDOW:
                    raise ProtocolError(f"agent sent output beyond its credit on job {f.id}")
                if job.sink is not None:
                    job.sink(f.type, f.payload)
                    credit = n
                else:
                    job.out_outstanding += n
                    job.chunks.append((f.type, f.payload))
            elif f.type is p.FrameType.CREDIT:
                n = p.parse_u32(f.type, f.payload)
                if job.stdin_credit + n > p.STDIN_WINDOW:
                    raise ProtocolError(f"agent returned more stdin credit than was used on job {f.id}")
                job.stdin_credit += n
            elif f.type is p.FrameType.EXIT:
                job.exit = p.parse_exit(f.payload)
            elif f.type is p.FrameType.ERROR:
                job.error = p.parse_error(f.payload)
            if job.done:
                job.finished = time.monotonic()
                del self._jobs[f.id]
                self._slots.release()
            job.cond.notify_all()
        if credit:
            self._send(p.encode_u32(p.FrameType.CREDIT, f.id, credit))

    def _open_job(self, argv: Sequence[str], sink: Sink | None, first_frame: Callable[[int], bytes]) -> _Job:
        self._slots.acquire()
        with self._lock:
            if self._broken is not None or self._closed:
                self._slots.release()
                raise self._broken or ConnectionLost("the client is closed")
            while self._next_id in self._jobs or self._next_id == 0:
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            fid = self._next_id
            self._next_id = (fid + 1) & 0xFFFFFFFF
            job = _Job(fid, argv, sink, threading.Condition(self._lock))
            self._jobs[fid] = job
            data = first_frame(fid)  # encode under the lock: a ValueError must not leak the slot
        try:
            self._send(data)
        except MicroVMError:
            self._forget(job)
            raise
        self._log.debug("-> job %d %s", fid, shlex.join(argv))
        return job

    def _forget(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.pop(job.id, None) is not None:
                self._slots.release()

    def _wait(self, job: _Job, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not job.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommandTimeout(f"no answer from the agent for job {job.id} within {timeout:.1f}s")
                job.cond.wait(remaining)

    def _send_stdin(self, job: _Job, data: bytes | memoryview, timeout: float | None = None) -> None:
        """Send data as STDIN frames within the job's credit; stops quietly once the job ended."""
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        while view:
            with self._lock:
                while job.stdin_credit == 0 and not job.done:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise CommandTimeout(f"the command did not read its stdin within {timeout:.1f}s")
                    job.cond.wait(remaining)
                if job.done:
                    job.raise_if_failed()
                    return
                n = min(job.stdin_credit, p.MAX_CHUNK, len(view))
                job.stdin_credit -= n
            self._send(p.frame(p.FrameType.STDIN, job.id, bytes(view[:n])))
            view = view[n:]

    def _close_stdin(self, job: _Job) -> None:
        with self._lock:
            if job.done:
                return
        self._send(p.frame(p.FrameType.STDIN, job.id))

    def _result(self, job: _Job, stdout: bytes, stderr: bytes) -> CommandResult:
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
    ) -> Process:
        """Start a command and return a handle to stream its input and output.

        ``cmd`` is an argv list, or a string run by ``/bin/sh -c``. ``stdin=True`` gives
        the command a pipe fed by :meth:`Process.write`; otherwise it reads /dev/null.
        ``timeout`` (seconds) is enforced by the agent, which kills the process group.
        ``pty=(rows, cols)`` runs it on a new pseudo-terminal of that size (its
        controlling terminal: job control and ^C work; all output arrives as stdout).
        """
        argv = _argv(cmd)
        job = self._start(argv, env, cwd, stdin or pty is not None, timeout, sink=None, pty=pty is not None)
        process = Process(self, job, timeout)
        if pty is not None:
            process.resize(*pty)
        return process

    def _start(
        self,
        argv: list[str],
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: bool,
        timeout: float | None,
        sink: Sink | None,
        pty: bool = False,
    ) -> _Job:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        for key in env or {}:
            if not key or "=" in key:
                raise ValueError(f"invalid environment variable name: {key!r}")
        env_list = [f"{k}={v}" for k, v in (env or {}).items()]
        timeout_ms = 0 if timeout is None else max(1, math.ceil(timeout * 1000))
        return self._open_job(
            argv,
            sink,
            lambda fid: p.encode_exec(
                fid, argv, env=env_list, cwd=cwd or "", stdin_pipe=stdin, pty=pty, timeout_ms=timeout_ms
            ),
        )

    def run(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run a command to completion and return its stdout, stderr and exit status.

        ``stdin`` bytes are streamed to the command, then its input is closed.
        With ``check=True`` a command that does not exit 0 raises :class:`CommandError`.
        Raises :class:`AgentError` if the command cannot be started (e.g. not found).
        """
        argv = _argv(cmd)
        out, err = bytearray(), bytearray()

        def collect(ftype: p.FrameType, data: bytes) -> None:
            (out if ftype is p.FrameType.STDOUT else err).extend(data)

        job = self._start(argv, env, cwd, stdin is not None, timeout, sink=collect)
        try:
            if stdin is not None:
                self._send_stdin(job, stdin)
                self._close_stdin(job)
            self._wait(job, None if timeout is None else timeout + _TIMEOUT_GRACE)
        except CommandTimeout:
            self._abandon(job)
            raise
        result = self._result(job, bytes(out), bytes(err))
        if check and not result.ok:
            raise CommandError(result)
        return result

    def _abandon(self, job: _Job) -> None:
        with contextlib.suppress(MicroVMError):
            self._send(p.encode_u32(p.FrameType.KILL, job.id, _signal.SIGKILL))

    def probe(self, timeout: float = 30.0) -> float:
        """Run the no-op probe through the whole exec path; return its round-trip time.

        Raises ProtocolError if the agent answers anything but exit 0 with no output.
        """
        result = self.run(list(PROBE_ARGV), timeout=timeout)
        if not result.ok or result.stdout or result.stderr:
            raise ProtocolError(f"probe failed: {result.describe()}, stdout={result.stdout[:200]!r}")
        return result.duration

    # ---- files -------------------------------------------------------------------

    def write_file(
        self, remote: str, data: bytes | BinaryIO, *, mode: int = 0o644, timeout: float | None = None
    ) -> None:
        """Create or replace the guest file ``remote`` with ``data`` (bytes or a binary file)."""
        job = self._open_job(["PUT", remote], None, lambda fid: p.encode_put(fid, remote, mode))
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._send_stdin(job, data, timeout)
        else:
            while chunk := data.read(p.STDIN_WINDOW):
                self._send_stdin(job, chunk, timeout)
        self._close_stdin(job)
        self._wait(job, timeout)
        job.raise_if_failed()

    def put_file(self, local: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> None:
        """Copy a host file into the guest, keeping its permission bits unless ``mode`` is given."""
        path = Path(local)
        with path.open("rb") as fh:
            self.write_file(remote, fh, mode=path.stat().st_mode & 0o7777 if mode is None else mode)

    def _get(self, remote: str, sink: Sink, timeout: float | None) -> None:
        job = self._open_job(["GET", remote], sink, lambda fid: p.encode_get(fid, remote))
        self._wait(job, timeout)
        job.raise_if_failed()

    def read_file(self, remote: str, *, timeout: float | None = None) -> bytes:
        """Return the content of a guest file."""
        buf = bytearray()
        self._get(remote, lambda _t, data: buf.extend(data), timeout)
        return bytes(buf)

    def get_file(self, remote: str, local: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        """Copy a guest file to the host path ``local`` (which the host, not the guest, names).

        Streams to disk with bounded memory; returns the number of bytes written. On
        failure the partial file is removed.
        """
        path = Path(local)
        written = 0
        with path.open("wb") as fh:

            def sink(_t: p.FrameType, data: bytes) -> None:
                nonlocal written
                fh.write(data)
                written += len(data)

            try:
                self._get(remote, sink, timeout)
            except BaseException:
                fh.close()
                path.unlink(missing_ok=True)
                raise
        return written

    # ---- clones --------------------------------------------------------------------

    def become_clone(self, token: str) -> None:
        """Send CLONE: the guest takes the host's clock now, fresh entropy and ``token``.

        Frames are handled in order, so a command sent after this runs in a guest that
        has applied it; an agent that could not apply it closes the connection, and that
        command fails with the agent's reason.
        """
        self._send(p.encode_clone(time.time_ns(), token, os.urandom(64)))

    # ---- power -------------------------------------------------------------------

    def poweroff(self, timeout: float = 10.0) -> None:
        """Ask the agent to power the guest off (exit, on the host); wait for the close."""
        self._send(p.frame(p.FrameType.POWEROFF, 0))
        self._reader.join(timeout)


class Process:
    """A running command: feed its stdin, read its output as it comes, kill it, wait for it."""

    def __init__(self, client: AgentClient, job: _Job, timeout: float | None) -> None:
        self._client = client
        self._job = job
        self._timeout = timeout
        self.argv = tuple(job.argv)

    @property
    def done(self) -> bool:
        """True once the agent reported the end of the command (output may remain unread)."""
        with self._client._lock:
            return self._job.done

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send bytes to the command's stdin (needs ``start(..., stdin=True)``).

        Blocks while the command is not reading (credit exhausted); ``timeout`` bounds that.
        """
        self._client._send_stdin(self._job, data, timeout)

    def close_stdin(self) -> None:
        """Signal end of input to the command."""
        self._client._close_stdin(self._job)

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a command started with ``pty=`` (it gets SIGWINCH)."""
        with self._client._lock:
            if self._job.done:
                return
        self._client._send(p.encode_winsize(self._job.id, rows, cols))

    def kill(self, sig: int = _signal.SIGKILL) -> None:
        """Send a signal to the command's process group in the guest."""
        with self._client._lock:
            if self._job.done:
                return
        self._client._send(p.encode_u32(p.FrameType.KILL, self._job.id, int(sig)))

    def read(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """Next chunk of output as ``("stdout" | "stderr", data)``; None once output ended.

        Raises CommandTimeout if nothing arrives within ``timeout`` seconds.
        """
        job, client = self._job, self._client
        deadline = None if timeout is None else time.monotonic() + timeout
        with client._lock:
            while not job.chunks and not job.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommandTimeout(f"no output from {shlex.join(self.argv)} within {timeout:.1f}s")
                job.cond.wait(remaining)
            if not job.chunks:
                job.raise_if_failed()
                return None
            ftype, data = job.chunks.popleft()
            job.out_outstanding -= len(data)
            send_credit = not job.done
        if send_credit:
            client._send(p.encode_u32(p.FrameType.CREDIT, job.id, len(data)))
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
                self._client._abandon(self._job)
                raise
            if chunk is None:
                break
            (out if chunk[0] == "stdout" else err).extend(chunk[1])
        return self._client._result(self._job, bytes(out), bytes(err))
