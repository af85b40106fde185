"""The one interface every vsock flavour gives a VM: :class:`Channel` and its listeners.

A flavour owns how QEMU gets the vsock device, where guest connections to the host
(CID 2) arrive, and how the host reaches a guest port. :mod:`pytest_microvm.machine.vm`
uses only this interface; which flavour it has is decided once, by
:func:`pytest_microvm.channel.open_channel`.

Both flavours behave alike at this interface, so a test of one is a test of the other:

- ``listen(port)``: the port the guest should connect to is ``listener.port``. ``port`` is
  taken when free; when it is not (kernel vsock ports are shared by every VM on the host,
  so another process or xdist worker may hold it), a free one is picked. Accepted peers
  are this VM's guest only.
- ``connect(port, timeout)``: a connected stream socket; a guest that refuses (nothing
  listens) is :class:`~pytest_microvm.errors.ConnectionLost` at once, no answer within
  ``timeout`` is :class:`~pytest_microvm.errors.CommandTimeout`.

Where they differ for snapshot clones is said here too, so that snapshot code never asks
which flavour it has: whether the device can be saved with the guest
(``device_migrates``), whether guest RAM must be shared with a process of ours
(``shared_memory``), and where the agent connects (:meth:`Channel.listen_agent`).
"""

from __future__ import annotations

import errno
import random
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pytest_microvm.errors import CommandTimeout, ConnectionLost, MicroVMError

PORT_RANGE = (1025, 65535)  # where a free port is picked when the asked one is taken
_BIND_ATTEMPTS = 32


class Listener(Protocol):
    """Where one VM's connections to host port ``port`` arrive."""

    port: int
    refused: list[str]  # why connections were turned away (a wrong CID), for error messages

    def accept(self, timeout: float | None) -> socket.socket:
        """The next connection from this VM's guest; CommandTimeout if none within ``timeout``."""
        ...

    def close(self) -> None: ...

    def __enter__(self: _Self) -> _Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


_Self = TypeVar("_Self")
L = TypeVar("L")


def bind_free(bind: Callable[[int], L], preferred: int | None, pick: Callable[[], int] | None = None) -> L:
    """``bind(preferred)``, or ``bind`` of random ports while the port is taken (EADDRINUSE).

    ``preferred=None`` starts with a random port. ``pick`` (tests) gives the next port to try.
    """
    rng = random.SystemRandom()
    next_pick = pick or (lambda: rng.randint(*PORT_RANGE))
    candidates: Iterator[int] = iter([preferred] if preferred is not None else [])
    for _ in range(_BIND_ATTEMPTS):
        port = next(candidates, None) or next_pick()
        try:
            return bind(port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise MicroVMError(f"no free host vsock port found in {_BIND_ATTEMPTS} tries")


def refused(port: int) -> ConnectionLost:
    """What connect() raises on either flavour when nothing listens on guest port ``port``."""
    return ConnectionLost(f"the guest refused a connection to vsock port {port}")


def unanswered(port: int, timeout: float) -> CommandTimeout:
    """What connect() raises on either flavour when the guest does not answer in time."""
    return CommandTimeout(f"guest vsock port {port} did not answer within {timeout}s")


class Channel(ABC):
    """One VM's vsock device and the host's end of it."""

    flavour: str  # "kernel" or "userspace", as VMConfig.vsock names it
    guest_cid: int
    # QEMU must put guest RAM in shared memory (a vhost-user backend maps it).
    shared_memory: bool = False
    # The device can be saved with a guest and loaded into another QEMU (a snapshot
    # clone keeps it); else a template is saved without it and each clone has it plugged.
    device_migrates: bool = False

    @abstractmethod
    def start(self) -> None:
        """Get ready for QEMU (a backend process, a guest CID); before qemu_args()/device()."""

    def qemu_args(self) -> list[str]:
        """QEMU arguments the device needs besides itself (a chardev); none by default."""
        return []

    @abstractmethod
    def device(self) -> tuple[str, dict[str, str]]:
        """The vsock device (driver, properties), for -device or QMP device_add."""

    @abstractmethod
    def listen(self, port: int | None = None) -> Listener:
        """Where this guest's connections to host port ``port`` arrive (see the module doc)."""

    def listen_agent(self, port: int) -> tuple[Listener, str]:
        """The listener the agent connects to, and the ``microvm.port=`` value that leads
        the agent there (docs/protocol.md). By default ``listen(port)`` and its number:
        right where each VM has ports of its own, so every clone of a template finds its
        host at the template's port."""
        listener = self.listen(port)
        return listener, str(listener.port)

    @abstractmethod
    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A connection to guest port ``port`` (see the module doc)."""

    def check_alive(self) -> None:  # noqa: B027 (a flavour without processes has nothing to check)
        """Raise a MicroVMError if a process the channel needs has died."""

    @property
    def pids(self) -> list[int]:
        """Host processes of the channel (a backend), besides QEMU."""
        return []

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What `microvm attach` needs to listen for the agent again (vm.json)."""

    @abstractmethod
    def stop(self) -> None:
        """Release everything (processes, sockets, the CID); safe to call twice."""

    def __enter__(self) -> Channel:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
