"""The kernel vhost-vsock flavour: an AF_VSOCK listener on the host, CID 2.

Only for hosts with a usable /dev/vhost-vsock (the fast path). Any process on the host
can connect to a host vsock port, so every accepted peer's CID is checked against the
guest we booted; others are closed unheard (the token in HELLO is the second check).
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable

from tenacity import retry, retry_if_exception, stop_after_attempt

from pytest_microvm.errors import CommandTimeout
from pytest_microvm.machine.allocation import PORT_RANGE

log = logging.getLogger(__name__)
VMADDR_CID_HOST = 2
DEFAULT_PORT = 1024


def _in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


class KernelVsockListener:
    """Listens on vsock CID 2 for one guest CID."""

    def __init__(self, guest_cid: int, port: int) -> None:
        self.guest_cid = guest_cid
        self.port = port
        self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind((VMADDR_CID_HOST, port))
            self._sock.listen(8)
        except BaseException:
            self._sock.close()
            raise

    @classmethod
    def bind_free(
        cls, guest_cid: int, preferred: int = DEFAULT_PORT, pick: Callable[[], int] | None = None
    ) -> KernelVsockListener:
        """Port ``preferred`` if free, else a random one (another xdist worker or program has it).

        The agent learns the port from the kernel command line. ``pick`` (tests) gives the
        next port to try after EADDRINUSE.
        """
        rng = random.SystemRandom()
        next_pick = pick or (lambda: rng.randint(*PORT_RANGE))
        ports = iter([preferred])

        @retry(retry=retry_if_exception(_in_use), stop=stop_after_attempt(32), reraise=True)
        def attempt() -> KernelVsockListener:
            return cls(guest_cid, next(ports, None) or next_pick())

        return attempt()

    def accept(self, timeout: float) -> socket.socket:
        """The next connection from our guest's CID; strangers are closed and logged."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(f"no connection from guest CID {self.guest_cid} within {timeout}s")
            self._sock.settimeout(remaining)
            try:
                conn, (cid, _port) = self._sock.accept()
            except TimeoutError:
                continue
            if cid == self.guest_cid:
                conn.settimeout(None)
                return conn
            log.warning("refused a vsock connection from CID %d (expected %d)", cid, self.guest_cid)
            conn.close()

    def close(self) -> None:
        self._sock.close()
