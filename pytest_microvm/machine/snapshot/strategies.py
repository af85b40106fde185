"""The snapshot launch strategies: saving a template, restoring a clone.

- :class:`SaveTemplate`: a boot whose RAM is a shared file in the template's staging
  directory, with the devices every clone will have (a PCIe root port for the vsock
  device, and on x86_64 a vmgenid: an aarch64 guest booted without ACPI cannot see one).
  Once probed it is quieted and saved (:meth:`SaveTemplate.save`):
  the agent's connection and listener closed, the guest stopped, its device state written
  with ``x-ignore-shared`` (the RAM is the file itself, so the state is a few hundred KiB).
  9p shares are not mounted in it: a mounted share blocks migration; clones mount theirs.
- :class:`RestoreClone`: QEMU started with ``-incoming defer`` on the clone's RAM
  (:mod:`.ram`), the state loaded from a descriptor opened with the RAM, the guest
  continued. The agent, which retries its connection every 10 ms, connects; the host
  sends CLONE (docs/protocol.md: clock, entropy, token) before the probe, and each clone
  has its own vmgenid.

What the vsock flavour changes is one choice, :func:`vsock_in_snapshot`, made from the
channel (``Channel.device_migrates``):

- :class:`KeptVsock` (``vhost-vsock-pci``, which migrates): the template keeps its device;
  each clone starts with it on its command line, with a guest CID of its own, and QEMU
  signals the guest a transport reset on load, on which the driver rereads its CID.
- :class:`PluggedVsock` (``vhost-user-vsock-pci``, which QEMU 7.2 cannot migrate): the
  template's device is unplugged before the save; each clone gets one hot-plugged after
  the restore (on the root port: ACPI PCI hotplug on x86_64, PCIe native hotplug on
  aarch64), with its own backend.

On the kernel path both ways work; measured side by side (bench/kernel_clones.py through
scripts/nested, TCG inside TCG, medians of 5) a clone keeping the device was ready in
6.62 s, one with a device plugged in 8.50 s: keeping it spares every clone the hot-plug
and the guest's probe of a new PCI device (and the template its settle time).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

from pytest_microvm import _logging, _wait
from pytest_microvm import arch as arches
from pytest_microvm.client import AgentClient
from pytest_microvm.image import GuestImage
from pytest_microvm.machine import launch
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import HostReport
from pytest_microvm.machine.launch import Launch, LaunchContext
from pytest_microvm.machine.qemu import Layout, device_args
from pytest_microvm.machine.qmp import MonitorError
from pytest_microvm.machine.snapshot.errors import MigrationFailed, SnapshotError, TemplateBroken, first_line
from pytest_microvm.machine.snapshot.ram import CloneRam, clone_ram, punch_zero_pages
from pytest_microvm.machine.snapshot.store import Template
from pytest_microvm.machine.vm import MicroVM

log = _logging.logger(__name__)

HOTPLUG_PORT = "microvm-hotplug"  # the PCIe root port the vsock device sits on
VSOCK_ID = "microvm-vsock"
VMGENID_ID = arches.VMGENID_ID
RESTORE_TIMEOUT = 30.0  # a restore is a fraction of a second; this bounds a stuck one
# After the template's vsock device is unplugged, before the guest is stopped: longer than
# the kernel's vsock connect timeout (2 s), so a connect request lost with the device times
# out here, once per template, and not in every clone (where it held the agent for 2 s).
# A shorter connect timeout in the agent instead left half-open connections on the host
# when a loaded host answered late.
UNPLUG_SETTLE = 2.5
SAVE_TIMEOUT = 20.0


def snapshot_devices(vmgenid: str, arch: str) -> list[str]:
    """Devices a template and its clones have in common beyond the config's: the root port
    the vsock device sits on, and what tells clones apart (the vmgenid, where the
    architecture has one)."""
    return [
        *device_args("pcie-root-port", id=HOTPLUG_PORT, bus="pcie.0", chassis=1),
        *arches.get(arch).identity_devices(vmgenid),
    ]


# ---- the vsock device in a snapshot -------------------------------------------------------


class VsockInSnapshot(ABC):
    """How a template and its clones hold the vsock device (see the module docstring)."""

    @abstractmethod
    def template_args(self, ctx: LaunchContext) -> list[str]:
        """The device on the template's command line."""

    @abstractmethod
    def before_save(self, ctx: LaunchContext, until: float) -> None:
        """After the agent is disconnected, before the guest is stopped."""

    @abstractmethod
    def clone_args(self, ctx: LaunchContext) -> list[str]:
        """The device on a clone's command line (before the restore)."""

    @abstractmethod
    def after_restore(self, ctx: LaunchContext) -> None:
        """The state is loaded; the guest has not continued."""


def _vsock_args(ctx: LaunchContext) -> list[str]:
    driver, props = ctx.channel.device()
    return device_args(driver, **props, id=VSOCK_ID, bus=HOTPLUG_PORT)


class KeptVsock(VsockInSnapshot):
    """Saved with the guest; a clone's own device (its CID) is on its command line."""

    def template_args(self, ctx: LaunchContext) -> list[str]:
        return _vsock_args(ctx)

    def before_save(self, ctx: LaunchContext, until: float) -> None:
        pass  # the agent's reconnects are refused at once; the restore resets the transport

    def clone_args(self, ctx: LaunchContext) -> list[str]:
        return _vsock_args(ctx)

    def after_restore(self, ctx: LaunchContext) -> None:
        pass


class PluggedVsock(VsockInSnapshot):
    """Unplugged from the template before the save, hot-plugged into each clone after the restore."""

    def template_args(self, ctx: LaunchContext) -> list[str]:
        return _vsock_args(ctx)

    def before_save(self, ctx: LaunchContext, until: float) -> None:
        ctx.monitor.device_del(VSOCK_ID)

        def released() -> bool | None:  # the guest ejects it when it gets to it
            ctx.raise_if_dead(SnapshotError)
            return VSOCK_ID not in ctx.monitor.peripherals() or None

        if _wait.until(released, until, 0.01) is None:
            raise ctx.failure(
                "the guest did not release its vsock device in time: cloning needs a kernel with "
                + arches.get(ctx.config.arch).hotplug,
                SnapshotError,
            )
        time.sleep(UNPLUG_SETTLE)

    def clone_args(self, ctx: LaunchContext) -> list[str]:
        return []

    def after_restore(self, ctx: LaunchContext) -> None:
        driver, props = ctx.channel.device()
        ctx.monitor.device_add(driver, VSOCK_ID, bus=HOTPLUG_PORT, **props)


def vsock_in_snapshot(ctx: LaunchContext) -> VsockInSnapshot:
    """The one place that chooses, from what the channel says of its device."""
    return KeptVsock() if ctx.channel.device_migrates else PluggedVsock()


# ---- migration -----------------------------------------------------------------------------


def await_migration(ctx: LaunchContext, until: float, what: str) -> None:
    """Wait for QEMU's migration (a save or a load) to complete."""
    status = "none"

    def completed() -> bool | None:
        nonlocal status
        ctx.raise_if_dead(SnapshotError)
        status, why = ctx.monitor.migration()
        if status in ("failed", "cancelled"):
            raise ctx.failure(f"{what} failed: {why}", MigrationFailed)
        return status == "completed" or None

    if _wait.until(completed, until, 0.005) is None:
        raise ctx.failure(f"{what} did not finish (status {status})", SnapshotError)


# ---- the strategies --------------------------------------------------------------------------


class SaveTemplate(Launch):
    """Boots the guest a template is saved from (see the module docstring)."""

    mounts_shares = False

    def __init__(self, ram: Path, *, vsock: VsockInSnapshot | None = None) -> None:
        """``vsock``: how the device is had (default: as the channel says; the benchmark
        measures the other way)."""
        self.ram = ram
        self._vsock = vsock

    def layout(self) -> Layout:
        self._vsock = self._vsock or vsock_in_snapshot(self.ctx)
        return Layout(
            args=[*snapshot_devices("auto", self.ctx.config.arch), *self._vsock.template_args(self.ctx)],
            # Pages the template guest frees are zeroed as they are freed, so that they
            # become holes in its RAM file (punch_zero_pages) and clones do not copy them.
            # Clones inherit it with the guest: a little guest CPU on every free.
            cmdline=["init_on_free=1"],
            ram_file=str(self.ram),
        )

    def save(self, state: Path, timeout: float = SAVE_TIMEOUT) -> None:
        """Quiet the started guest and write its device state to ``state``."""
        assert self._vsock is not None, "save() before the template VM started"
        ctx = self.ctx
        until = time.monotonic() + timeout
        # No listener first: the agent's reconnects are refused, so no connection is open
        # in the guest when it is saved. Then the connection it has.
        ctx.disconnect_agent()
        self._vsock.before_save(ctx, until)
        ctx.monitor.pause()
        ctx.monitor.set_migration_capabilities(x_ignore_shared=True)
        ctx.monitor.migrate(f"exec:cat > {shlex.quote(str(state))}")
        await_migration(ctx, until, "saving the template")


class RestoreClone(Launch):
    """Restores a :class:`~.store.Template` into a fresh QEMU (see the module docstring)."""

    failure_kind = SnapshotError
    cloned = True

    def __init__(self, template: Template, *, vsock: VsockInSnapshot | None = None) -> None:
        """``vsock``: how the device is had (default: as the channel says; tests give a
        faulty one, the benchmark the other way); it must be the template's way."""
        self.template = template
        self.hello_token = template.token  # until CLONE gives the guest its own
        self.vmgenid = str(uuid.uuid4())
        self.restore_seconds: float | None = None
        self._ram: CloneRam | None = None
        self._state_fd: int | None = None
        self._vsock = vsock

    def layout(self) -> Layout:
        ctx = self.ctx
        self._vsock = self._vsock or vsock_in_snapshot(ctx)
        self._ram = clone_ram(self.template, shared=ctx.channel.shared_memory, name=ctx.name)
        try:
            # The state goes with the RAM it was saved with: both are open before we check
            # that the template was not remade meanwhile (another process, a broken one).
            self._state_fd = os.open(self.template.state, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotError(f"cannot read snapshot template {self.template.key}'s state ({exc})") from exc
        if self.template.current_id() != self.template.id:
            raise SnapshotError(f"snapshot template {self.template.key} was remade while this clone started")
        return Layout(
            args=[*snapshot_devices(self.vmgenid, ctx.config.arch), *self._vsock.clone_args(ctx), "-incoming", "defer"],
            ram_file=self._ram.path,
            ram_shared=self._ram.shared,
            pass_fds=self._ram.pass_fds,
        )

    def launched(self, deadline: float) -> None:
        assert self._ram is not None and self._vsock is not None and self._state_fd is not None
        ctx = self.ctx
        started = time.monotonic()
        until = min(deadline, started + RESTORE_TIMEOUT)
        try:
            ctx.connect_monitor(until)
            try:
                self._ram.ready()
            except SnapshotError as exc:
                raise ctx.failure(str(exc), SnapshotError) from exc  # with the console and QEMU's stderr
            ctx.monitor.set_migration_capabilities(x_ignore_shared=True)
            ctx.monitor.send_fd("microvm-state", self._state_fd)
            os.close(self._state_fd)
            self._state_fd = None
            ctx.monitor.migrate_incoming("fd:microvm-state")
            self._await_restore(until)
            self._vsock.after_restore(ctx)
            ctx.monitor.resume()
        except MonitorError as exc:
            raise ctx.failure(f"restoring the snapshot failed: {exc}", SnapshotError) from exc
        self.restore_seconds = time.monotonic() - started

    def _await_restore(self, until: float) -> None:
        ctx = self.ctx
        try:
            await_migration(ctx, until, "restoring the snapshot")
        except (SnapshotError, MonitorError) as exc:
            # QEMU exits on a state it cannot load (its monitor drops): let it say why.
            ctx.wait_exit(time.monotonic() + 2.0)
            # Only the state's own failure condemns the template, which other processes
            # share: not a QEMU that was killed, nor a deadline missed under load.
            broken = isinstance(exc, MigrationFailed) or "load of migration failed" in ctx.qemu.stderr()
            kind = TemplateBroken if broken else SnapshotError
            raise ctx.failure(f"the template's saved state did not load: {first_line(exc)}", kind) from exc

    def agent_deadline(self, deadline: float) -> tuple[float, float | None]:
        # A restored agent connects within a second; one that has not after RESTORE_TIMEOUT
        # never will (a kernel that missed the hot-plug): a snapshot problem, which the
        # caller answers with a boot, not a boot-timeout wait.
        return min(deadline, time.monotonic() + RESTORE_TIMEOUT), RESTORE_TIMEOUT

    def connected(self, client: AgentClient) -> str:
        token = secrets.token_hex(16)
        client.become_clone(token)
        return token  # the agent says this one from now on (a reconnect, microvm attach)

    def release(self) -> None:
        if self._ram is not None:
            self._ram.close()
        if self._state_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._state_fd)
            self._state_fd = None


def save_template(
    config: VMConfig, image: GuestImage, host: HostReport, staging: Path, *, vsock: VsockInSnapshot | None = None
) -> str:
    """Boot ``config`` as a template into ``staging`` (``ram``, ``state``); the agent's token."""
    made: list[SaveTemplate] = []

    def make() -> MicroVM:
        made.append(SaveTemplate(staging / "ram", vsock=vsock))  # a new one for each attempt
        return MicroVM(config.with_(image=image), host=host, name="template", launch=made[-1])

    vm = launch.start(make)
    try:
        # What the guest holds only as cache is freed (and zeroed: init_on_free), so that
        # clones neither copy it nor own it. Written by the agent itself, so that a root
        # without a shell is no different.
        vm.write_file("/proc/sys/vm/drop_caches", b"3\n")
        made[-1].save(staging / "state")
        # The guest is paused and its RAM final (x-ignore-shared: the file is the RAM).
        try:
            punched = punch_zero_pages(staging / "ram")
            log.debug("template RAM: %d MiB of zero pages made holes", punched >> 20)
        except OSError as exc:  # a cache on a file system without holes: clones copy more
            log.warning("template RAM: its zero pages cannot be made holes (%s); clones copy them", exc)
        return vm.token
    finally:
        vm.stop(graceful=False)


def restore_clone(config: VMConfig, template: Template, host: HostReport, *, name: str) -> MicroVM:
    """A started clone of ``template``; SnapshotError (or TemplateBroken) if it did not come up."""
    return launch.start(lambda: MicroVM(config, host=host, name=name, launch=RestoreClone(template)))
