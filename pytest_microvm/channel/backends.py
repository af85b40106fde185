"""How a userspace-vsock backend process comes to run, and how it is watched and stopped.

Two ways, one interface (:class:`BackendProcess`), chosen in :func:`start_backend`:

- :class:`ForkedBackend`: a child of this process's fork server
  (:mod:`.vhost_user.forkserver`), one long-lived interpreter that forks a backend per
  VM. The default: a VM's backend then costs the host a fork, not an interpreter.
- :class:`SpawnedBackend`: an interpreter of its own (``python -m
  pytest_microvm.channel.vhost_user``). For a VM kept running after this process exits
  (``--keep``, keep-on-failure: its backend must outlive the fork server), and with
  ``MICROVM_VSOCK_BACKEND=own`` (a backend to debug on its own; the benchmarks' baseline),
  and on kernels older than 5.3, which have no pidfds.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Protocol

from pytest_microvm import _proc, _wait
from pytest_microvm.channel.vhost_user.forkserver import ENDED, describe_status
from pytest_microvm.errors import MicroVMError


class BackendError(MicroVMError):
    """The userspace vsock backend failed or is gone; its stderr tail says why."""


class BackendProcess(Protocol):
    """One VM's backend process, however it was started."""

    pid: int

    def exited(self) -> str | None:
        """None while it runs; else how it ended (e.g. "exited with status 1")."""

    def stop(self, grace: float) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds; returns once it has ended."""


def _readable(fd: int, timeout: float) -> bool:
    """poll, not select: a test process holding many VMs has descriptors past 1024."""
    events = select.poll()
    events.register(fd, select.POLLIN)
    return bool(events.poll(timeout * 1000))


class SpawnedBackend:
    """A backend in an interpreter of its own, a child of this process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.pid = proc.pid

    def exited(self) -> str | None:
        status = self._proc.poll()
        return None if status is None else describe_status(status)

    def stop(self, grace: float) -> None:
        _proc.stop(self._proc, grace)


class ForkedBackend:
    """A child of the fork server, watched through a pidfd (it is not our child)."""

    def __init__(self, pid: int, pidfd: int, stderr_path: str, server: subprocess.Popen[bytes]) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._stderr_path = stderr_path
        self._server = server  # the server that forked it: its children end with it

    def _ended(self, timeout: float) -> bool:
        return self._pidfd < 0 or _readable(self._pidfd, timeout)

    def exited(self) -> str | None:
        if not self._ended(0):
            return None
        # The server reaps it at once and appends how it ended to its stderr file.
        how = _wait.until(self._how_it_ended, time.monotonic() + 2, 0.01)
        return how or "ended (how is unknown: the fork server did not say)"

    def _how_it_ended(self) -> str | None:
        with contextlib.suppress(OSError), open(self._stderr_path, "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 200))
            tail = log.read().decode(errors="replace")
            if ENDED in tail:
                return tail.rsplit(ENDED, 1)[1].strip()
        server_status = self._server.poll()
        if server_status is not None:
            return (
                f"ended with the fork server that forked it (pid {self._server.pid}), "
                f"which {describe_status(server_status)}"
            )
        return None

    def stop(self, grace: float) -> None:
        if self._pidfd < 0:
            return
        try:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                if self._ended(0):
                    break
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)
                _wait.until(lambda: self._ended(0) or None, time.monotonic() + wait, 0.01)
        finally:
            os.close(self._pidfd)
            self._pidfd = -1


class _Unanswered(Exception):
    """The fork server runs but has not answered in time (a very loaded host)."""


class ForkServer:
    """This process's fork server: started on first use, started again if it died.

    Requests come from any thread (a test's, the clone pool's), one at a time, each with
    an id its reply repeats: a reply that comes after its request gave up (Ctrl-C, a very
    loaded host) is known as such, and the backend it forked for nobody is killed. A server
    that is slow is never killed for it: its other children serve running VMs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._owner = 0  # the pid that started it: a forked copy of this process starts its own
        self._last_id = 0
        self.answer_timeout = 30.0  # an interpreter starting on a loaded 2-core host

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._owner == os.getpid() else None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._stderr = tempfile.TemporaryFile(prefix="microvm-forkserver-")  # noqa: SIM115 (kept: read by _discard)
        try:
            argv = [sys.executable, "-m", "pytest_microvm.channel.vhost_user.forkserver"]
            argv += ["--socket-fd", str(theirs.fileno()), "--for-pid", str(os.getpid())]
            # Not tied to the thread that starts it (PR_SET_PDEATHSIG would end it with a
            # pool thread): it ends when its socket does, which a dead process also closes.
            self._proc = _proc.spawn(argv, stderr=self._stderr, pass_fds=[theirs.fileno()], die_with_parent=False)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock, self._owner = ours, os.getpid()
        return ours

    def _discard(self) -> str:
        """Forget a server that stopped answering; its stderr tail."""
        tail = ""
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                self._stderr.seek(0)
                tail = self._stderr.read()[-2000:].decode(errors="replace")
            self._stderr.close()
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            _proc.stop(self._proc, 1.0)
        self._sock = self._proc = self._stderr = None
        return tail

    def _request(
        self, sock: socket.socket, request: dict[str, Any], fds: list[int]
    ) -> tuple[dict[str, Any], list[int]]:
        self._last_id += 1
        request = {**request, "id": self._last_id}
        socket.send_fds(sock, [json.dumps(request).encode()], fds)
        deadline = time.monotonic() + self.answer_timeout
        while True:
            while not _readable(sock.fileno(), _wait.SLICE):  # sliced: Ctrl-C gets in
                if self._proc is not None and self._proc.poll() is not None:
                    raise ConnectionError(f"it {describe_status(self._proc.returncode)}")
                if time.monotonic() > deadline:
                    raise _Unanswered
            data, reply_fds, _flags, _addr = socket.recv_fds(sock, 4096, 1)
            if not data:
                raise ConnectionError("end of file")
            reply = json.loads(data)
            if reply.get("id") == request["id"]:
                return reply, reply_fds
            for fd in reply_fds:  # a backend forked for a request that gave up: nobody's
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)

    def fork(self, control: socket.socket, stderr: IO[bytes], uds: str, guest_cid: int) -> ForkedBackend:
        """A backend for one VM: QEMU connects to ``control``, its stderr goes to ``stderr``."""
        request = {"uds": uds, "guest_cid": guest_cid}
        with self._lock:
            if self._owner != os.getpid():  # first use, or a forked copy of the process
                self._sock = self._proc = self._stderr = None
            for attempt in (1, 2):
                sock = self._sock or self._start()
                try:
                    reply, fds = self._request(sock, request, [control.fileno(), stderr.fileno()])
                    server = self._proc
                    break
                except _Unanswered:
                    raise BackendError(
                        f"the vsock backends' fork server did not answer within {self.answer_timeout:g} s "
                        "(is the host overloaded?)"
                    ) from None
                except (OSError, ConnectionError, ValueError) as exc:
                    # It died (killed, out of memory): a new one serves this VM and later ones.
                    tail = self._discard()
                    if attempt == 2:
                        raise BackendError(f"the vsock backends' fork server failed twice ({exc}):\n{tail}") from None
        if "pid" not in reply or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"the vsock backends' fork server refused: {reply.get('error', reply)}")
        assert server is not None
        return ForkedBackend(int(reply["pid"]), fds[0], stderr.name, server)

    def close(self) -> None:
        """End the server (its backends with it); for tests and interpreter exit."""
        with self._lock:
            if self._owner == os.getpid():
                self._discard()


_SERVER = ForkServer()
# At a normal exit the server is stopped and reaped here (it would also end on its own,
# at the end of file of its socket, but unreaped).
atexit.register(_SERVER.close)


def fork_server() -> ForkServer:
    """This process's fork server."""
    return _SERVER


@functools.cache
def _pidfds_work() -> bool:
    """Whether this kernel has pidfds (Linux 5.3 and later), which the fork server's
    backends are watched through; without them every VM's backend is an interpreter of its own."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def start_backend(
    control: socket.socket, stderr: IO[bytes], uds: str, guest_cid: int, *, die_with_parent: bool
) -> BackendProcess:
    """Start one VM's backend: QEMU will connect to the listening ``control`` socket.

    The one place that chooses how a backend runs (see the module docstring).
    """
    if die_with_parent and os.environ.get("MICROVM_VSOCK_BACKEND", "fork") != "own" and _pidfds_work():
        return _SERVER.fork(control, stderr, uds, guest_cid)
    argv = [sys.executable, "-m", "pytest_microvm.channel.vhost_user", "--socket-fd", str(control.fileno())]
    argv += ["--uds", uds, "--guest-cid", str(guest_cid)]
    proc = _proc.spawn(argv, stderr=stderr, pass_fds=[control.fileno()], die_with_parent=die_with_parent)
    return SpawnedBackend(proc)
