"""The kernel vhost-vsock flavour: QEMU's ``vhost-vsock-pci`` and AF_VSOCK sockets on the host.

For hosts with a usable /dev/vhost-vsock (the fast path), under KVM or TCG. Guest CIDs
and host ports are global on a host: each VM claims a CID (:mod:`.allocation`), and a
host port another process holds is traded for a free one (:func:`.base.bind_free`).
Any guest on the host can connect to a host vsock port, so every accepted peer's CID is
checked against this VM's; others are closed unheard and counted (the agent's token is
the second check, in HELLO).

The agent's own port is the guest's CID (``microvm.port=cid``): unique on the host while
the VM lives, and found by a snapshot clone's agent on its own, since every clone of a
template shares the template's kernel command line but not its CID. A CID is therefore
claimed only together with its port (:meth:`KernelVsock.start`). ``vhost-vsock-pci``
migrates, so a clone keeps the template's device and is launched with a CID of its own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
import time
from types import TracebackType
from typing import Any

from pytest_microvm import _logging, _wait
from pytest_microvm.channel.allocation import LAST_CID, Claim, claim_random
from pytest_microvm.channel.base import Channel, Listener, bind_free, refused, unanswered
from pytest_microvm.errors import CommandTimeout, MicroVMError

log = _logging.logger(__name__)
VMADDR_CID_HOST = 2
DEFAULT_PORT = 1024
# CIDs are drawn from here: each is also the agent's host port, and ports below 1024 need
# CAP_NET_BIND_SERVICE. 0xFFFFFFFF is "any" for both.
AGENT_CIDS = (DEFAULT_PORT + 1, LAST_CID)
_CLAIM_ATTEMPTS = 32
_rng = random.SystemRandom()  # where CIDs are drawn from (a test scripts a taken one)
# SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD (a struct timeval): the kernel gives up a vsock connect
# after 2 s by default, whatever timeout the caller asked for. Python's setsockopt only
# passes integers for AF_VSOCK, so libc's is called directly.
_SO_VM_SOCKETS_CONNECT_TIMEOUT = 6
_libc = ctypes.CDLL(None, use_errno=True)


def _set_connect_timeout(sock: socket.socket, seconds: float) -> None:
    tv = ctypes.create_string_buffer(struct.pack("qq", int(seconds), int(seconds % 1 * 1_000_000)), 16)
    if _libc.setsockopt(sock.fileno(), socket.AF_VSOCK, _SO_VM_SOCKETS_CONNECT_TIMEOUT, tv, 16) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setting the vsock connect timeout: {os.strerror(err)}")


class KernelVsockListener:
    """Listens on host vsock port ``port`` (CID 2) for one guest CID."""

    def __init__(self, guest_cid: int, port: int) -> None:
        self.guest_cid = guest_cid
        self.port = port
        self.refused: list[str] = []  # why connections were turned away (for a timeout's message)
        self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind((VMADDR_CID_HOST, port))
            self._sock.listen(128)
        except BaseException:
            self._sock.close()
            raise

    @classmethod
    def bind_free(cls, guest_cid: int, preferred: int | None = DEFAULT_PORT) -> KernelVsockListener:
        """Port ``preferred`` if free, else a random free one (another worker or program has it)."""
        return bind_free(lambda port: cls(guest_cid, port), preferred)

    def accept(self, timeout: float | None) -> socket.socket:
        """The next connection from our guest's CID; strangers are closed, logged and counted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise CommandTimeout(
                    f"no connection from guest CID {self.guest_cid} to port {self.port} within {timeout}s"
                )
            self._sock.settimeout(_wait.slice_of(remaining))  # a long wait, in slices: see _wait
            try:
                conn, (cid, _port) = self._sock.accept()
            except TimeoutError:
                continue
            if cid == self.guest_cid:
                conn.settimeout(None)
                return conn
            why = f"a connection from CID {cid}, not this VM's CID {self.guest_cid}"
            log.warning("port %d refused %s", self.port, why)
            self.refused.append(why)
            conn.close()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KernelVsockListener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(guest_cid: int, port: int, timeout: float) -> socket.socket:
    """An AF_VSOCK connection to (guest_cid, port), with the errors both flavours raise."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        _set_connect_timeout(sock, max(timeout, 0.001))
        sock.settimeout(timeout)
        sock.connect((guest_cid, port))
    except (ConnectionResetError, ConnectionRefusedError):
        sock.close()
        raise refused(port) from None
    except TimeoutError:
        sock.close()
        raise unanswered(port, timeout) from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class KernelVsock(Channel):
    """``vhost-vsock-pci`` with a claimed guest CID; the host's side is plain AF_VSOCK."""

    flavour = "kernel"
    device_migrates = True

    def __init__(self) -> None:
        self.guest_cid = 0
        self._claim: Claim | None = None
        self._agent: KernelVsockListener | None = None

    def start(self) -> None:
        """Claim a guest CID whose host port is free too: the agent's listener is bound here."""
        for _ in range(_CLAIM_ATTEMPTS):
            claim = claim_random("cid", *AGENT_CIDS, rng=_rng)
            try:
                self._agent = KernelVsockListener(claim.value, claim.value)
            except OSError as exc:
                claim.release()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # another program listens on that port: another CID
            self._claim = claim
            self.guest_cid = claim.value
            return
        raise MicroVMError(f"no guest CID with a free host port found in {_CLAIM_ATTEMPTS} tries")

    def listen_agent(self, port: int) -> tuple[Listener, str]:
        """The listener on the port numbered as the guest's CID (bound in start()); ``port``
        does not apply: see the module docstring."""
        if self._agent is None:
            raise MicroVMError("the kernel vsock channel has no agent listener before start()")
        listener, self._agent = self._agent, None  # the caller closes it
        return listener, "cid"

    def device(self) -> tuple[str, dict[str, str]]:
        if self._claim is None:
            raise MicroVMError("the kernel vsock channel has no guest CID before start()")
        return "vhost-vsock-pci", {"guest-cid": str(self.guest_cid)}

    def listen(self, port: int | None = None) -> KernelVsockListener:
        return KernelVsockListener.bind_free(self.guest_cid, port)

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        return connect(self.guest_cid, port, timeout)

    def state(self) -> dict[str, Any]:
        return {"guest_cid": self.guest_cid}

    def stop(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None
