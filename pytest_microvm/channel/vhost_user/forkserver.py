"""The fork server: one interpreter per host process that forks a backend for each VM.

    python -m pytest_microvm.channel.vhost_user.forkserver --socket-fd N --for-pid PID

A new interpreter per VM cost the host ~70 ms of CPU and ~15 MiB of memory for every
fresh VM (start-up and imports), more than a clone's own work on the host. This process
pays that once: it imports the backend, then forks a child per VM. Each VM still has a
process of its own, so one guest's bad descriptors, a slow reader or a reset can only
fail that VM's device, never another's streams.

The protocol on the inherited ``SOCK_SEQPACKET`` socket, one datagram each way:

- request: JSON ``{"id": N, "uds": PATH, "guest_cid": N}`` with two fds: the listening
  vhost-user socket QEMU will connect to, and the file the backend's stderr goes to;
- reply: JSON ``{"id": N, "pid": N}`` with one fd, a pidfd of the child (the harness
  watches and stops it through that, with no race against pid reuse), or
  ``{"id": N, "error": TEXT}``. The id is the request's, so that a reply that comes late
  is not taken for the answer to a later request.

The harness cannot learn a grandchild's exit status, so the server, which reaps each
child the moment it ends, appends how it ended to that child's stderr file, as the last
line: ``vhost-user-vsock[PID]: ended: killed by signal 9 (SIGKILL)`` (:data:`ENDED`).

The server exits when its socket reaches end of file: the harness closed it, or died
(SIGKILL included: the kernel closes its end). Its children have ``PR_SET_PDEATHSIG``
set to this single-threaded process, so they end with it, and so a harness that dies
leaves no backend behind. The server runs in a session of its own: Ctrl-C at a
terminal reaches the harness, which stops its VMs, not their backends under them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Sequence

from pytest_microvm import _proc

MAX_REQUEST = 64 * 1024
ENDED = "]: ended: "  # the server's last line in a child's stderr file (see the docstring)


def describe_status(status: int) -> str:
    """A ``subprocess`` return code (negative: killed by that signal) in words."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "?"
        return f"killed by signal {-status} ({name})"
    return f"exited with status {status}"


def _serve_child(control_fd: int, stderr_fd: int, uds: str, guest_cid: int, server: int) -> int:
    """In the forked child: become one VM's backend."""
    _proc.set_parent_death_signal()
    if os.getppid() != server:  # the server died before the line above took effect
        return 1
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    # SIGTERM is how the harness stops a backend: unwind, so that its socket file goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from pytest_microvm.channel.vhost_user.backend import run  # imported by main() before any fork

    return run(socket.socket(fileno=control_fd), uds, guest_cid)


class _Child:
    """A child being served: its pidfd (to see it end at once) and its stderr file."""

    def __init__(self, pid: int, stderr_fd: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.stderr_fd = os.dup(stderr_fd)

    def reap(self) -> None:
        """Reap it and write how it ended where the harness will look."""
        _, wait_status = os.waitpid(self.pid, 0)
        line = f"vhost-user-vsock[{self.pid}{ENDED}{describe_status(os.waitstatus_to_exitcode(wait_status))}\n"
        with contextlib.suppress(OSError):
            os.write(self.stderr_fd, line.encode())
        os.close(self.stderr_fd)
        os.close(self.pidfd)


def _fork(
    sock: socket.socket, request: dict[str, object], fds: list[int], children: dict[int, _Child]
) -> tuple[dict[str, object], list[int]]:
    """Fork one backend for ``request``; the reply and the fds to send with it."""
    uds, guest_cid = request.get("uds"), request.get("guest_cid")
    if not isinstance(uds, str) or not isinstance(guest_cid, int) or len(fds) != 2:
        return {"error": f"bad request {request!r} with {len(fds)} fds (want uds, guest_cid and 2 fds)"}, []
    if not 3 <= guest_cid < 0xFFFFFFFF:
        return {"error": f"guest_cid {guest_cid}: CIDs 0, 1, 2 and 0xffffffff are reserved"}, []
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            sock.close()
            for other in children.values():  # the other VMs' logs are not this backend's to hold
                os.close(other.pidfd)
                os.close(other.stderr_fd)
            status = _serve_child(fds[0], fds[1], uds, guest_cid, server)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(status)
    # Not reaped before the next round of the loop, so its pid is still its own.
    child = children[pid] = _Child(pid, fds[1])
    return {"pid": pid}, [os.dup(child.pidfd)]


def serve(sock: socket.socket) -> int:
    """Answer requests on ``sock`` until it reaches end of file."""
    children: dict[int, _Child] = {}
    while True:
        # poll, not select: with hundreds of VMs the descriptors pass select's limit of 1024.
        events = select.poll()
        for fd in (sock.fileno(), *(c.pidfd for c in children.values())):
            events.register(fd, select.POLLIN)
        ready = {fd for fd, _ in events.poll()}
        for child in [c for c in children.values() if c.pidfd in ready]:
            del children[child.pid]
            child.reap()
        if sock.fileno() not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 2)
        except ConnectionResetError:
            return 0
        if not data:
            for fd in fds:
                os.close(fd)
            return 0
        reply_fds: list[int] = []
        try:
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                reply: dict[str, object] = {"error": f"unreadable request: {exc}"}
            else:
                reply, reply_fds = _fork(sock, request, fds, children)
                reply["id"] = request.get("id")  # which request this answers (see the docstring)
            socket.send_fds(sock, [json.dumps(reply).encode()], reply_fds)
        finally:
            for fd in fds + reply_fds:
                os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_microvm.channel.vhost_user.forkserver")
    ap.add_argument("--socket-fd", type=int, required=True, help="the inherited SOCK_SEQPACKET socket of requests")
    ap.add_argument("--for-pid", type=int, required=True, help="the harness process served (to find us by)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="vhost-user-vsock[%(process)d] %(levelname)s %(message)s")
    # Imported and loaded once here, before any fork, so that a child starts serving
    # without importing, or looking libc up (find_library may run ldconfig).
    import pytest_microvm.channel.vhost_user.backend  # noqa: F401

    _proc.load_libc()

    return serve(socket.socket(fileno=args.socket_fd))


if __name__ == "__main__":
    sys.exit(main())
