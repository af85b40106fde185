"""Launch strategies: how a VM comes to life — a boot, a snapshot template's boot, a clone.

:class:`~pytest_microvm.machine.vm.MicroVM` runs one launch: it makes the work directory
and the vsock channel, starts QEMU, waits for the agent, probes it. What differs between
ways of launching sits behind :class:`Launch`, and MicroVM never asks which one it holds
(the model is pytest-xdist's scheduler protocol: one small interface, one class per
variant, chosen by the caller). :class:`Boot` is the plain one; the snapshot strategies
are in :mod:`pytest_microvm.machine.snapshot.strategies`.

A strategy sees the VM only through :class:`LaunchContext`, which MicroVM hands it once
(:meth:`Launch.attach`) before anything else.

:func:`start` is the one way every launch path starts a VM: it retries with a new guest
CID when the host's vhost-vsock says the CID is taken (by a program that is not ours, so
our lock files could not know).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from tenacity import retry, retry_if_exception, stop_after_attempt

from pytest_microvm.errors import BootError, GuestError
from pytest_microvm.machine.qemu import Layout, device_args

if TYPE_CHECKING:
    from pytest_microvm.channel import Channel
    from pytest_microvm.client import AgentClient
    from pytest_microvm.machine.config import VMConfig
    from pytest_microvm.machine.qemu import QemuProcess
    from pytest_microvm.machine.qmp import Monitor


class LaunchContext(Protocol):
    """What a launch strategy may use of the VM it launches; nothing else of MicroVM."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> VMConfig: ...

    @property
    def workdir(self) -> Path: ...

    @property
    def channel(self) -> Channel:
        """Started before :meth:`Launch.layout`."""
        ...

    @property
    def monitor(self) -> Monitor:
        """Not connected: QEMU serves it from its start; a strategy that talks to QEMU
        before the guest is up connects it (:meth:`connect_monitor`)."""
        ...

    @property
    def qemu(self) -> QemuProcess: ...

    def connect_monitor(self, until: float) -> None:
        """Connect QMP as soon as QEMU serves it (MonitorError after ``until``)."""
        ...

    def disconnect_agent(self) -> None:
        """Close the agent's connection and its listener: its reconnects go unanswered."""
        ...

    def failure(self, message: str, kind: type[GuestError]) -> GuestError:
        """``kind(message)`` with the console's and QEMU's stderr's tails attached."""
        ...

    def raise_if_dead(self, kind: type[GuestError]) -> None:
        """Raise ``kind`` if QEMU exited, the guest panicked or the channel's backend died."""
        ...

    def wait_exit(self, until: float) -> bool:
        """Wait until QEMU exits (True) or ``until`` passes (False)."""
        ...


class Launch:
    """How one VM comes to life; the base is a plain boot. The extension points, in the order MicroVM uses them:

    - :meth:`attach`: the context, before anything is made.
    - :meth:`layout`: the RAM and the devices QEMU starts with (the vsock device among
      them, or not); called once the channel is started, before QEMU starts.
    - :meth:`launched`: QEMU runs, the guest has not connected (a clone is restored here).
    - :meth:`agent_deadline`: how long the agent may take to connect, and the wait an
      error names.
    - ``hello_token``: the token the agent says in HELLO (default: the VM's own).
    - :meth:`connected`: the agent said HELLO, the probe has not run (a clone takes its
      own identity here and returns the token its agent says from now on).
    - :meth:`release`: MicroVM stops, whatever state the launch reached.

    ``failure_kind`` is the error every failure of this launch is raised as;
    ``mounts_shares``: the VM mounts its 9p shares once ready (a template must not: a
    mounted share blocks migration); ``cloned``: the VM is a clone (``vm.cloned``).
    """

    failure_kind: type[GuestError] = BootError
    mounts_shares = True
    cloned = False
    hello_token: str | None = None
    ctx: LaunchContext

    def attach(self, ctx: LaunchContext) -> None:
        self.ctx = ctx

    def layout(self) -> Layout:
        """A boot's: the vsock device on the command line, RAM as the channel needs it."""
        driver, props = self.ctx.channel.device()
        return Layout(args=device_args(driver, **props))

    def launched(self, deadline: float) -> None:
        """QEMU runs; the agent has not connected yet."""

    def agent_deadline(self, deadline: float) -> tuple[float, float | None]:
        """(when to give up on the agent, the wait to name in the error: None for the boot timeout)."""
        return deadline, None

    def connected(self, client: AgentClient) -> str | None:
        """After HELLO, before the probe; the token the agent says from now on (None: unchanged)."""
        return None

    def release(self) -> None:
        """Release what the launch holds (descriptors, threads); safe to call twice."""


class Boot(Launch):
    """A fresh boot of the image: the default."""


def _cid_in_use(exc: BaseException) -> bool:
    return isinstance(exc, BootError) and "guest cid: Address already in use" in exc.qemu_stderr


class _Startable(Protocol):
    def start(self) -> object: ...


VM = TypeVar("VM", bound=_Startable)  # a MicroVM (this module does not import the lifecycle)


def start(make: Callable[[], VM]) -> VM:
    """``make().start()``, again with a new VM (a new guest CID) while the host's kernel
    vhost-vsock says the CID is taken: by a program not of ours, which our lock files do
    not know. Every launch path (a boot, a template, a clone) starts its VMs here."""

    @retry(retry=retry_if_exception(_cid_in_use), stop=stop_after_attempt(5), reraise=True)
    def attempt() -> VM:
        vm = make()
        vm.start()
        return vm

    return attempt()
