"""The framed connection to one agent: what every command and file transfer runs over.

Owns the socket after the HELLO handshake (and the handshake itself), the send lock, and
the reader thread that decodes frames and hands each to the job whose id it carries. It
also owns the credit scheme of docs/protocol.md in both directions, since the reader is
what sees CREDIT and output frames arrive: stdin is sent only within the job's credit,
and queued output is credited back only as it is taken, so an unread job stalls in the
guest instead of filling host memory. It knows nothing of what a job is for: commands
(:mod:`.commands`) and file transfers (:mod:`.files`) open jobs through :meth:`Connection.open_job`.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import shlex
import socket
import threading
import time
from collections.abc import Callable, Sequence

from pytest_microvm import _logging, _wait
from pytest_microvm import protocol as p
from pytest_microvm.errors import (
    AgentError,
    CommandTimeout,
    ConnectionLost,
    HandshakeError,
    MicroVMError,
    ProtocolError,
)

# The package's logger rather than this module's: log records keep the names they had
# before the client was split into modules (pytest_microvm.client and .client.<name>).
log = _logging.logger("pytest_microvm.client")

# Receives a job's output (or a GET's content) as it arrives, on the reader thread.
Sink = Callable[[p.FrameType, bytes], None]


class Job:
    """Host-side state of one job; guarded by the connection's lock."""

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


def handshake(sock: socket.socket, *, token: str, timeout: float) -> p.Hello:
    """Read the agent's HELLO, check version and token, answer HELLO_ACK; return the HELLO.

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
    return hello


class Connection:
    """A handshaken socket, its reader thread and the jobs open on it. Thread-safe."""

    def __init__(self, sock: socket.socket, *, name: str) -> None:
        self._sock = sock
        self._log = log.getChild(name)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next_id = 1
        self._slots = threading.BoundedSemaphore(p.MAX_JOBS)
        self._broken: MicroVMError | None = None
        self._closed = False
        self.reader = threading.Thread(target=self._read_loop, name=f"microvm-{name}-reader", daemon=True)
        self.reader.start()

    # ---- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; jobs still waiting fail with ConnectionLost."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        _wait.join(self.reader, 5)
        self._sock.close()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._broken is None and not self._closed

    # ---- the wire ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send encoded frames whole: the send lock keeps threads' frames from interleaving."""
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
            self.send(p.encode_u32(p.FrameType.CREDIT, f.id, credit))

    # ---- jobs --------------------------------------------------------------------

    def open_job(self, argv: Sequence[str], sink: Sink | None, first_frame: Callable[[int], bytes]) -> Job:
        """Register a job under a fresh id and send ``first_frame(id)``, the frame that starts it.

        ``sink`` takes the job's output on the reader thread, credited back at once;
        without one it is queued for :meth:`take_output`. Blocks while MAX_JOBS are open.
        """
        _wait.acquire(self._slots)
        with self._lock:
            if self._broken is not None or self._closed:
                self._slots.release()
                raise self._broken or ConnectionLost("the client is closed")
            while self._next_id in self._jobs or self._next_id == 0:
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            fid = self._next_id
            self._next_id = (fid + 1) & 0xFFFFFFFF
            job = Job(fid, argv, sink, threading.Condition(self._lock))
            self._jobs[fid] = job
            data = first_frame(fid)  # encode under the lock: a ValueError must not leak the slot
        try:
            self.send(data)
        except MicroVMError:
            self._forget(job)
            raise
        self._log.debug("-> job %d %s", fid, shlex.join(argv))
        return job

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.pop(job.id, None) is not None:
                self._slots.release()

    def finished(self, job: Job) -> bool:
        """Whether the job has ended (EXIT, ERROR, or the connection failed)."""
        with self._lock:
            return job.done

    def wait(self, job: Job, timeout: float | None) -> None:
        """Wait for the job to end; CommandTimeout if it has not within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not job.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommandTimeout(f"no answer from the agent for job {job.id} within {timeout:.1f}s")
                job.cond.wait(_wait.slice_of(remaining))

    def send_stdin(self, job: Job, data: bytes | memoryview, timeout: float | None = None) -> None:
        """Send data as STDIN frames within the job's credit; stops quietly once the job ended."""
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        while view:
            with self._lock:
                while job.stdin_credit == 0 and not job.done:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise CommandTimeout(f"the command did not read its stdin within {timeout:.1f}s")
                    job.cond.wait(_wait.slice_of(remaining))
                if job.done:
                    job.raise_if_failed()
                    return
                n = min(job.stdin_credit, p.MAX_CHUNK, len(view))
                job.stdin_credit -= n
            self.send(p.frame(p.FrameType.STDIN, job.id, bytes(view[:n])))
            view = view[n:]

    def close_stdin(self, job: Job) -> None:
        """Send the empty STDIN frame that ends the job's input, unless the job already ended."""
        if self.finished(job):
            return
        self.send(p.frame(p.FrameType.STDIN, job.id))

    def take_output(self, job: Job, timeout: float | None) -> tuple[p.FrameType, bytes] | None:
        """Next queued output chunk of a job opened without a sink; None once output ended.

        Credits the chunk back to the agent, which is what lets it send more. Raises
        CommandTimeout if nothing arrives within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not job.chunks and not job.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CommandTimeout(f"no output from {shlex.join(job.argv)} within {timeout:.1f}s")
                job.cond.wait(_wait.slice_of(remaining))
            if not job.chunks:
                job.raise_if_failed()
                return None
            ftype, data = job.chunks.popleft()
            job.out_outstanding -= len(data)
            # An ended job wants no more output, and its id may already name a new job.
            send_credit = not job.done
        if send_credit:
            self.send(p.encode_u32(p.FrameType.CREDIT, job.id, len(data)))
        return ftype, data
