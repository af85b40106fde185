"""machine/launch.py's Boot and machine/snapshot/strategies.py's launch strategies without
a VM: each strategy is attached to a fake LaunchContext (a monitor that records the QMP
calls it gets and answers ``migration()`` and ``peripherals()`` from a script, a channel
of either vsock flavour, a QEMU with a stderr) and driven through the extension points
MicroVM uses. Covered: what each puts on QEMU's command line (``layout``), how a template
is quieted and saved (``SaveTemplate.save``, with the vsock device kept or unplugged),
how a clone is restored (``RestoreClone.launched``: the QMP sequence, which failures
condemn the template), the clone's identity (``connected``), its deadlines, the
descriptors it holds (``release``), the choice of ``vsock_in_snapshot``, and
``save_template``/``restore_clone`` over a stand-in MicroVM.
"""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.client import AgentClient
from pytest_microvm.errors import BootError, GuestError
from pytest_microvm.machine.launch import Boot, Launch, LaunchContext
from pytest_microvm.machine.qemu import Layout
from pytest_microvm.machine.qmp import MonitorError
from pytest_microvm.machine.snapshot import ram, strategies
from pytest_microvm.machine.snapshot.errors import MigrationFailed, SnapshotError, TemplateBroken
from pytest_microvm.machine.snapshot.store import Template
from pytest_microvm.machine.snapshot.strategies import (
    HOTPLUG_PORT,
    RESTORE_TIMEOUT,
    VMGENID_ID,
    VSOCK_ID,
    KeptVsock,
    PluggedVsock,
    RestoreClone,
    SaveTemplate,
    restore_clone,
    save_template,
    snapshot_devices,
    vsock_in_snapshot,
)
from tests.snapshot_fakes import MIB, guest_image, host_report, open_fds, rewrite_meta, targets, write_template

ROOT_PORT = ["-device", f"pcie-root-port,id={HOTPLUG_PORT},bus=pcie.0,chassis=1"]
Event = tuple[Any, ...]

# ---- a LaunchContext without a VM ---------------------------------------------------------------


class FakeChannel:
    """What the strategies use of a Channel: its device, and the two facts about it."""

    def __init__(self, driver: str, props: dict[str, str], *, migrates: bool, shared: bool) -> None:
        self.driver, self.props = driver, props
        self.device_migrates = migrates
        self.shared_memory = shared

    def device(self) -> tuple[str, dict[str, str]]:
        return self.driver, dict(self.props)

    def device_arg(self) -> str:
        """The device as a -device value, with its snapshot id and the hot-plug port."""
        return ",".join(
            [self.driver, *(f"{k}={v}" for k, v in self.props.items()), f"id={VSOCK_ID}", f"bus={HOTPLUG_PORT}"]
        )


def kernel_channel() -> FakeChannel:
    """As channel/kernel.py's: vhost-vsock-pci migrates; RAM need not be shared."""
    return FakeChannel("vhost-vsock-pci", {"guest-cid": "70002"}, migrates=True, shared=False)


def userspace_channel() -> FakeChannel:
    """As channel/userspace.py's: QEMU 7.2 cannot migrate vhost-user-vsock-pci; the backend maps RAM."""
    return FakeChannel("vhost-user-vsock-pci", {"chardev": "vsock"}, migrates=False, shared=True)


CHANNELS: dict[str, Callable[[], FakeChannel]] = {"kernel": kernel_channel, "userspace": userspace_channel}


def _next(script: list[Any]) -> Any:
    """The next answer of a script; its last one again and again."""
    return script.pop(0) if len(script) > 1 else script[0]


class FakeMonitor:
    """Records every call (with when it came) in the context's event list; ``migration()``
    and ``peripherals()`` answer from scripts; ``errors`` makes a call raise."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.at: dict[str, float] = {}  # the last call of each name: when
        self.migrations: list[tuple[str, str]] = [("completed", "completed")]
        self.peripheral_sets: list[set[str]] = [{HOTPLUG_PORT, VMGENID_ID}]
        self.errors: dict[str, BaseException] = {}
        self.on_migrate_incoming: Callable[[], None] | None = None
        self.sent: list[tuple[str, str, bytes]] = []  # send_fd: name, what the descriptor is, its content

    def _call(self, name: str, *args: Any) -> None:
        self.events.append((name, *args))
        self.at[name] = time.monotonic()
        if name in self.errors:
            raise self.errors[name]

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")

    def set_migration_capabilities(self, **capabilities: bool) -> None:
        self._call("set_migration_capabilities", capabilities)

    def migrate(self, uri: str) -> None:
        self._call("migrate", uri)

    def migrate_incoming(self, uri: str) -> None:
        self._call("migrate_incoming", uri)
        if self.on_migrate_incoming is not None:
            self.on_migrate_incoming()

    def migration(self) -> tuple[str, str]:
        self._call("migration")
        return cast(tuple[str, str], _next(self.migrations))

    def send_fd(self, name: str, fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        self.sent.append((name, target, os.pread(fd, 1 << 20, 0)))
        self._call("send_fd", name, target)

    def device_add(self, driver: str, id: str, **props: str) -> None:
        self._call("device_add", driver, id, props)

    def device_del(self, id: str) -> None:
        self._call("device_del", id)

    def peripherals(self) -> set[str]:
        self._call("peripherals")
        return set(_next(self.peripheral_sets))


class FakeQemu:
    def __init__(self) -> None:
        self.stderr_text = ""

    def stderr(self) -> str:
        return self.stderr_text


class FakeContext:
    """A LaunchContext: what a strategy may use of its VM, each use recorded in ``events``."""

    def __init__(self, workdir: Path, channel: FakeChannel, name: str = "clone") -> None:
        self.name = name
        self.config = VMConfig()
        self.workdir = workdir
        self.channel = channel
        self.events: list[Event] = []
        self.monitor = FakeMonitor(self.events)
        self.qemu = FakeQemu()
        self.dead: str | None = None  # raise_if_dead raises this (QEMU exited, a panic)
        self.checked: list[type[GuestError]] = []  # the kinds raise_if_dead was asked to raise
        self.monitor_until: float | None = None

    def connect_monitor(self, until: float) -> None:
        self.monitor_until = until
        self.events.append(("connect_monitor",))

    def disconnect_agent(self) -> None:
        self.events.append(("disconnect_agent",))

    def failure(self, message: str, kind: type[GuestError]) -> GuestError:
        return kind(message)

    def raise_if_dead(self, kind: type[GuestError]) -> None:
        self.checked.append(kind)
        if self.dead is not None:
            raise self.failure(self.dead, kind)

    def wait_exit(self, until: float) -> bool:
        self.events.append(("wait_exit",))
        return True


def attached(launch: Launch, tmp_path: Path, channel: FakeChannel, name: str = "clone") -> FakeContext:
    """``launch`` attached to a new fake context (as MicroVM.start does first)."""
    ctx = FakeContext(tmp_path, channel, name)
    launch.attach(cast(LaunchContext, ctx))
    return ctx


def without_polls(events: list[Event]) -> list[Event]:
    return [e for e in events if e[0] not in ("migration", "peripherals")]


class FakeClient:
    def __init__(self) -> None:
        self.clone_tokens: list[str] = []

    def become_clone(self, token: str) -> None:
        self.clone_tokens.append(token)


@pytest.fixture(autouse=True)
def _no_shm_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone's copied RAM is a memfd unless a test sets $MICROVM_SHM_DIR itself."""
    monkeypatch.delenv("MICROVM_SHM_DIR", raising=False)


RAM_CHUNKS = {0: b"boot sector".ljust(4096, b"\0"), 5 * MIB: b"the guest's heap" * 256}
STATE = b"device state " * 1000


@pytest.fixture
def template(tmp_path: Path) -> Template:
    """A sound 8 MiB template in the cache (its RAM sparse, with data at two places)."""
    directory = tmp_path / "cache" / "templates" / "somekey"
    write_template(directory, token="template-token", chunks=RAM_CHUNKS, state=STATE)
    return Template.load(directory)


def _content(template: Template) -> bytes:
    return template.ram.read_bytes()


# ---- Boot: the plain launch -------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_boot_layout_puts_the_channels_device_on_the_command_line(tmp_path: Path, flavour: str) -> None:
    channel = CHANNELS[flavour]()
    boot = Boot()
    ctx = attached(boot, tmp_path, channel)
    driver, props = channel.device()
    device = ",".join([driver, *(f"{k}={v}" for k, v in props.items())])
    assert boot.layout() == Layout(args=["-device", device])  # RAM as the channel needs it: no file
    assert ctx.events == []


def test_boot_leaves_every_other_extension_point_alone(tmp_path: Path) -> None:
    boot = Boot()
    ctx = attached(boot, tmp_path, userspace_channel())
    assert (boot.failure_kind, boot.mounts_shares, boot.cloned, boot.hello_token) == (BootError, True, False, None)
    boot.launched(time.monotonic() + 10)
    assert boot.agent_deadline(123.0) == (123.0, None)  # the boot timeout, named as such
    client = FakeClient()
    assert boot.connected(cast(AgentClient, client)) is None and client.clone_tokens == []
    boot.release()
    boot.release()
    assert ctx.events == [] and ctx.checked == []


# ---- SaveTemplate: the guest a template is saved from --------------------------------------------


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_save_template_layout_has_the_clones_devices_and_its_ram_in_the_file(tmp_path: Path, flavour: str) -> None:
    channel = CHANNELS[flavour]()
    ram = tmp_path / "staging" / "ram"
    save = SaveTemplate(ram)
    ctx = attached(save, tmp_path, channel)
    layout = save.layout()
    assert layout.args == [
        *ROOT_PORT,
        *["-device", f"vmgenid,id={VMGENID_ID},guid=auto"],
        *["-device", channel.device_arg()],  # on the root port, under the id the save refers to
    ]
    assert layout.args[:4] == snapshot_devices("auto", "x86_64")
    assert layout.ram_file == str(ram) and layout.ram_shared  # QEMU writes the guest's RAM into the file
    assert layout.pass_fds == ()
    assert ctx.events == []  # nothing asked of QEMU before it starts


def test_save_template_neither_mounts_shares_nor_is_a_clone(tmp_path: Path) -> None:
    save = SaveTemplate(tmp_path / "ram")
    assert not save.mounts_shares  # a mounted 9p share blocks migration
    assert not save.cloned and save.hello_token is None and save.failure_kind is BootError
    assert save.agent_deadline(5.0) == (5.0, None)


def _saving(tmp_path: Path, channel: FakeChannel, **kwargs: Any) -> tuple[SaveTemplate, FakeContext, Path]:
    """A SaveTemplate laid out (as when its guest is up) and where its state goes."""
    staging = tmp_path / "staging dir"  # a space: the shell command must quote it
    save = SaveTemplate(staging / "ram", **kwargs)
    ctx = attached(save, tmp_path, channel, name="template")
    save.layout()
    return save, ctx, staging / "state"


def test_save_with_a_device_that_migrates_keeps_it(tmp_path: Path) -> None:
    save, ctx, state = _saving(tmp_path, kernel_channel())
    ctx.monitor.migrations = [("setup", "setup"), ("active", "active"), ("completed", "completed")]
    save.save(state)
    assert ctx.events == [
        ("disconnect_agent",),  # no connection open in the guest when it is saved
        ("pause",),
        ("set_migration_capabilities", {"x_ignore_shared": True}),  # RAM is the file: not in the stream
        ("migrate", f"exec:cat > {shlex.quote(str(state))}"),
        ("migration",),
        ("migration",),
        ("migration",),
    ]
    assert shlex.quote(str(state)) != str(state)  # the quoting mattered
    assert set(ctx.checked) == {SnapshotError}  # QEMU watched while waiting


def test_save_with_a_device_that_does_not_migrate_unplugs_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategies, "UNPLUG_SETTLE", 0)
    save, ctx, state = _saving(tmp_path, userspace_channel())
    plugged, released = {HOTPLUG_PORT, VMGENID_ID, VSOCK_ID}, {HOTPLUG_PORT, VMGENID_ID}
    ctx.monitor.peripheral_sets = [plugged, plugged, released]  # the guest ejects it when it gets to it
    save.save(state)
    assert ctx.events == [
        ("disconnect_agent",),
        ("device_del", VSOCK_ID),
        ("peripherals",),
        ("peripherals",),
        ("peripherals",),  # gone: only now is the guest stopped
        ("pause",),
        ("set_migration_capabilities", {"x_ignore_shared": True}),
        ("migrate", f"exec:cat > {shlex.quote(str(state))}"),
        ("migration",),
    ]
    assert SnapshotError in ctx.checked and set(ctx.checked) == {SnapshotError}


def test_save_settles_after_the_unplug_before_it_stops_the_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the guest kernel's vsock connect timeout (2 s): a connect request lost with
    # the device times out in the template, not in every clone.
    assert strategies.UNPLUG_SETTLE > 2.0
    monkeypatch.setattr(strategies, "UNPLUG_SETTLE", 0.2)
    save, ctx, state = _saving(tmp_path, userspace_channel())
    save.save(state)
    assert ctx.monitor.at["pause"] - ctx.monitor.at["peripherals"] >= 0.2


def test_save_of_a_device_the_guest_never_releases_names_the_kernel_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategies, "UNPLUG_SETTLE", 0)
    save, ctx, state = _saving(tmp_path, userspace_channel())
    ctx.monitor.peripheral_sets = [{HOTPLUG_PORT, VMGENID_ID, VSOCK_ID}]
    started = time.monotonic()
    with pytest.raises(SnapshotError, match="did not release its vsock device in time") as info:
        save.save(state, timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 5.0
    assert type(info.value) is SnapshotError
    assert all(option in str(info.value) for option in ("PCIEPORTBUS", "HOTPLUG_PCI", "HOTPLUG_PCI_ACPI"))
    assert without_polls(ctx.events) == [("disconnect_agent",), ("device_del", VSOCK_ID)]  # never stopped or saved
    assert len(ctx.checked) > 1  # QEMU watched throughout


def test_save_of_a_guest_that_dies_during_the_unplug_says_so(tmp_path: Path) -> None:
    save, ctx, state = _saving(tmp_path, userspace_channel())
    ctx.monitor.peripheral_sets = [{VSOCK_ID}]
    ctx.dead = "QEMU exited with status 1"
    started = time.monotonic()
    with pytest.raises(SnapshotError, match="QEMU exited with status 1"):
        save.save(state)
    assert time.monotonic() - started < 5.0  # at once, not after the save timeout
    assert without_polls(ctx.events) == [("disconnect_agent",), ("device_del", VSOCK_ID)]


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_save_whose_migration_fails_is_migration_failed(tmp_path: Path, status: str) -> None:
    save, ctx, state = _saving(tmp_path, kernel_channel())
    ctx.monitor.migrations = [("active", "active"), (status, "Unable to write to command: Broken pipe")]
    with pytest.raises(MigrationFailed, match="saving the template failed: Unable to write to command"):
        save.save(state)
    assert ctx.events.count(("migration",)) == 2


def test_save_that_does_not_finish_in_time_is_a_snapshot_error(tmp_path: Path) -> None:
    save, ctx, state = _saving(tmp_path, kernel_channel())
    ctx.monitor.migrations = [("active", "active")]
    with pytest.raises(SnapshotError, match=r"saving the template did not finish \(status active\)") as info:
        save.save(state, timeout=0.1)
    assert not isinstance(info.value, MigrationFailed)


def test_save_template_given_a_way_uses_it_over_the_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategies, "UNPLUG_SETTLE", 0)
    channel = kernel_channel()  # would be kept: the benchmark measures unplugging it instead
    save, ctx, state = _saving(tmp_path, channel, vsock=PluggedVsock())
    save.save(state)
    assert ("device_del", VSOCK_ID) in ctx.events


# ---- RestoreClone: a fresh QEMU loading a template ---------------------------------------------


@pytest.mark.parametrize(("shared", "migrates"), [(True, False), (False, True), (True, True), (False, False)])
def test_restore_layout_has_the_templates_devices_and_loads_later(
    tmp_path: Path, template: Template, shared: bool, migrates: bool
) -> None:
    channel = FakeChannel("some-vsock-pci", {"x": "1"}, migrates=migrates, shared=shared)
    clone = RestoreClone(template)
    ctx = attached(clone, tmp_path, channel)
    layout = clone.layout()
    try:
        kept = ["-device", channel.device_arg()] if migrates else []  # plugged ones come after the restore
        assert layout.args == [
            *ROOT_PORT,
            *["-device", f"vmgenid,id={VMGENID_ID},guid={clone.vmgenid}"],
            *kept,
            *["-incoming", "defer"],
        ]
        assert layout.ram_shared is shared
        assert ctx.events == []
    finally:
        clone.release()


def test_each_clone_has_a_vmgenid_of_its_own(template: Template) -> None:
    ids = {RestoreClone(template).vmgenid for _ in range(3)}
    assert len(ids) == 3
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_restore_layout_for_a_shared_channel_copies_the_ram(tmp_path: Path, template: Template) -> None:
    fds = open_fds()
    clone = RestoreClone(template)
    attached(clone, tmp_path, userspace_channel())
    layout = clone.layout()
    try:
        (fd,) = layout.pass_fds
        assert layout.ram_file == f"/proc/self/fd/{fd}" and layout.ram_shared  # the backend maps it too
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")  # nameless
        assert os.fstat(fd).st_size == 8 * MIB
        states = [f for f, target in targets(open_fds() - fds).items() if target == str(template.state)]
        assert len(states) == 1  # the state, opened with the RAM
    finally:
        clone.release()
    assert open_fds() == fds


def test_restore_layout_for_an_unshared_channel_maps_the_templates_ram(tmp_path: Path, template: Template) -> None:
    fds = open_fds()
    clone = RestoreClone(template)
    attached(clone, tmp_path, kernel_channel())
    layout = clone.layout()
    try:
        (fd,) = layout.pass_fds
        assert layout.ram_file == f"/proc/self/fd/{fd}" and not layout.ram_shared  # share=off: copy-on-write
        assert os.readlink(f"/proc/self/fd/{fd}") == str(template.ram)
        with pytest.raises(OSError):
            os.write(fd, b"x")  # O_RDONLY
        # No copy: the only new descriptors are the template's RAM and its state.
        new = set(targets(open_fds() - fds).values())
        assert new == {str(template.ram), str(template.state)}
    finally:
        clone.release()
    assert open_fds() == fds


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_restore_layout_refuses_a_template_remade_meanwhile(tmp_path: Path, template: Template, flavour: str) -> None:
    fds = open_fds()
    rewrite_meta(template.directory, id="remade")  # another process found it broken and remade it
    clone = RestoreClone(template)
    attached(clone, tmp_path, CHANNELS[flavour]())
    with pytest.raises(SnapshotError, match="snapshot template somekey was remade while this clone started") as info:
        clone.layout()
    assert not isinstance(info.value, TemplateBroken)  # the new one is fine
    clone.release()  # MicroVM.stop releases what the failed start opened
    assert open_fds() == fds


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_restore_layout_of_a_template_without_its_state_is_a_snapshot_error(
    tmp_path: Path, template: Template, flavour: str
) -> None:
    fds = open_fds()
    template.state.unlink()
    clone = RestoreClone(template)
    attached(clone, tmp_path, CHANNELS[flavour]())
    with pytest.raises(SnapshotError, match="cannot read snapshot template somekey's state") as info:
        clone.layout()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    clone.release()
    assert open_fds() == fds


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_restore_layout_of_a_template_without_its_ram_is_a_snapshot_error(
    tmp_path: Path, template: Template, flavour: str
) -> None:
    fds = open_fds()
    template.ram.unlink()
    clone = RestoreClone(template)
    attached(clone, tmp_path, CHANNELS[flavour]())
    with pytest.raises(SnapshotError, match="cannot read snapshot template somekey's RAM"):
        clone.layout()
    clone.release()
    assert open_fds() == fds


def _laid_out(tmp_path: Path, template: Template, channel: FakeChannel) -> tuple[RestoreClone, FakeContext, int]:
    """A clone laid out (QEMU about to start) and its RAM's descriptor."""
    clone = RestoreClone(template)
    ctx = attached(clone, tmp_path, channel)
    (ram_fd,) = clone.layout().pass_fds
    return clone, ctx, ram_fd


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_restore_loads_the_state_then_plugs_what_was_not_kept_then_resumes(
    tmp_path: Path, template: Template, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = CHANNELS[flavour]()
    real_copy = ram.copy_extents

    def slow_copy(src: int, dst: int, size: int) -> None:
        time.sleep(0.2)  # a copy still running when QEMU is up: the restore must wait for it
        real_copy(src, dst, size)

    monkeypatch.setattr(ram, "copy_extents", slow_copy)
    fds = open_fds()
    clone, ctx, ram_fd = _laid_out(tmp_path, template, channel)
    content = _content(template)
    ram_at_load: list[bytes] = []
    ctx.monitor.on_migrate_incoming = lambda: ram_at_load.append(os.pread(ram_fd, len(content) + 1, 0))
    ctx.monitor.migrations = [("active", "active"), ("completed", "completed")]
    assert clone.restore_seconds is None
    try:
        clone.launched(time.monotonic() + 60)
        driver, props = channel.device()
        plug = [] if channel.device_migrates else [("device_add", driver, VSOCK_ID, {"bus": HOTPLUG_PORT, **props})]
        assert ctx.events == [
            ("connect_monitor",),  # before the guest is up
            ("set_migration_capabilities", {"x_ignore_shared": True}),
            ("send_fd", "microvm-state", str(template.state)),
            ("migrate_incoming", "fd:microvm-state"),
            ("migration",),
            ("migration",),
            *plug,
            ("resume",),
        ]
        assert ctx.monitor.sent == [("microvm-state", str(template.state), STATE)]
        assert ram_at_load == [content]  # the RAM held the template's pages before the state loaded
        assert isinstance(clone.restore_seconds, float) and 0 <= clone.restore_seconds < 10
        # The state's descriptor went to QEMU and was closed here; the RAM's stays until release.
        assert open_fds() - fds == {str(ram_fd)}
    finally:
        clone.release()
    assert open_fds() == fds
    clone.release()  # twice: nothing more to do
    assert open_fds() == fds
    assert _content(template) == content  # the template's RAM untouched


def test_restore_waits_for_the_monitor_no_longer_than_the_deadline(tmp_path: Path, template: Template) -> None:
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    try:
        soon = time.monotonic() + 5.0
        clone.launched(soon)
        assert ctx.monitor_until == soon
    finally:
        clone.release()
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    try:
        before = time.monotonic()
        clone.launched(before + 1000)
        assert ctx.monitor_until is not None
        assert before + RESTORE_TIMEOUT <= ctx.monitor_until <= time.monotonic() + RESTORE_TIMEOUT
    finally:
        clone.release()


def _failed_restore(ctx: FakeContext, clone: RestoreClone, deadline: float = 60.0) -> SnapshotError:
    with pytest.raises(SnapshotError) as info:
        clone.launched(time.monotonic() + deadline)
    assert ("resume",) not in ctx.events and not [e for e in ctx.events if e[0] == "device_add"]
    return info.value


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_a_restore_whose_state_does_not_load_condemns_the_template(
    tmp_path: Path, template: Template, flavour: str
) -> None:
    fds = open_fds()
    clone, ctx, _ = _laid_out(tmp_path, template, CHANNELS[flavour]())
    ctx.monitor.migrations = [("active", "active"), ("failed", "load of migration failed: Invalid argument")]
    error = _failed_restore(ctx, clone)
    assert isinstance(error, TemplateBroken)
    assert str(error).startswith("the template's saved state did not load: restoring the snapshot failed: load of")
    assert ("wait_exit",) in ctx.events  # QEMU given a moment to say why
    clone.release()
    assert open_fds() == fds


def test_a_restore_that_only_times_out_keeps_the_template(tmp_path: Path, template: Template) -> None:
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    ctx.monitor.migrations = [("active", "active")]
    started = time.monotonic()
    error = _failed_restore(ctx, clone, deadline=0.2)  # a loaded host: a deadline missed
    assert time.monotonic() - started < 5.0
    assert type(error) is SnapshotError and "did not finish (status active)" in str(error)
    assert ("wait_exit",) in ctx.events
    clone.release()


def test_a_restore_that_times_out_as_qemu_refuses_the_state_condemns_it(tmp_path: Path, template: Template) -> None:
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    ctx.monitor.migrations = [("active", "active")]
    ctx.qemu.stderr_text = "qemu-system-x86_64: load of migration failed: Input/output error\n"
    assert isinstance(_failed_restore(ctx, clone, deadline=0.2), TemplateBroken)
    clone.release()


@pytest.mark.parametrize(
    ("stderr", "broken"), [("", False), ("qemu-system-x86_64: load of migration failed: Invalid argument", True)]
)
def test_a_qemu_that_dies_during_the_restore_condemns_the_template_only_if_it_refused_the_state(
    tmp_path: Path, template: Template, stderr: str, broken: bool
) -> None:
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    ctx.monitor.migrations = [("active", "active")]
    ctx.qemu.stderr_text = stderr

    def die() -> None:
        ctx.dead = "QEMU exited with status 1"  # killed, or refused what it was loading

    ctx.monitor.on_migrate_incoming = die
    error = _failed_restore(ctx, clone)
    assert isinstance(error, TemplateBroken) is broken
    assert "the template's saved state did not load: " in str(error) and "QEMU exited with status 1" in str(error)
    clone.release()


def test_a_monitor_that_drops_during_the_restore_is_a_snapshot_error(tmp_path: Path, template: Template) -> None:
    clone, ctx, _ = _laid_out(tmp_path, template, kernel_channel())
    ctx.monitor.errors["migration"] = MonitorError("QMP query-migrate failed: EOF")
    error = _failed_restore(ctx, clone)
    assert type(error) is SnapshotError and "QMP query-migrate failed" in str(error)
    assert ("wait_exit",) in ctx.events
    clone.release()


@pytest.mark.parametrize("call", ["set_migration_capabilities", "send_fd", "migrate_incoming", "device_add", "resume"])
def test_a_monitor_that_refuses_a_step_of_the_restore_is_a_snapshot_error_and_leaks_nothing(
    tmp_path: Path, template: Template, call: str
) -> None:
    fds = open_fds()
    clone, ctx, _ = _laid_out(tmp_path, template, userspace_channel())  # plugged: device_add is a step
    ctx.monitor.errors[call] = MonitorError(f"QMP {call}: refused")
    with pytest.raises(SnapshotError, match=f"restoring the snapshot failed: QMP {call}: refused") as info:
        clone.launched(time.monotonic() + 60)
    assert type(info.value) is SnapshotError  # a hot-plug refused is tried again, not a broken template
    assert ctx.events[-1][0] == call  # nothing after the refused step
    clone.release()
    assert open_fds() == fds  # the state's descriptor too, if it never reached QEMU


def test_a_clone_waits_for_its_agent_no_longer_than_a_restore_takes(template: Template) -> None:
    clone = RestoreClone(template)
    now = time.monotonic()
    until, limit = clone.agent_deadline(now + 1000.0)
    assert limit == RESTORE_TIMEOUT  # the wait its error names
    assert now + RESTORE_TIMEOUT <= until <= time.monotonic() + RESTORE_TIMEOUT
    assert clone.agent_deadline(now + 1.0) == (now + 1.0, RESTORE_TIMEOUT)  # the boot's deadline, if sooner


def test_a_clone_takes_an_identity_of_its_own_once_connected(template: Template) -> None:
    clone = RestoreClone(template)
    assert clone.hello_token == "template-token"  # its agent says the template's until CLONE
    client = FakeClient()
    token = clone.connected(cast(AgentClient, client))
    assert client.clone_tokens == [token]
    assert len(token) == 32 and int(token, 16) >= 0 and token != template.token
    other = FakeClient()
    assert RestoreClone(template).connected(cast(AgentClient, other)) != token  # each clone its own


def test_a_clone_is_a_clone_that_mounts_its_shares(template: Template) -> None:
    clone = RestoreClone(template)
    assert clone.cloned and clone.mounts_shares  # 9p shares are mounted after the restore
    assert clone.failure_kind is SnapshotError  # every failure: boot instead
    assert clone.template is template


def test_release_before_layout_is_nothing_to_do(template: Template) -> None:
    fds = open_fds()
    clone = RestoreClone(template)
    clone.release()
    clone.release()
    assert open_fds() == fds


@pytest.mark.parametrize("flavour", sorted(CHANNELS))
def test_release_after_layout_closes_what_it_opened(tmp_path: Path, template: Template, flavour: str) -> None:
    fds = open_fds()
    clone, _, _ = _laid_out(tmp_path, template, CHANNELS[flavour]())
    assert open_fds() != fds
    clone.release()  # QEMU never started: the copy (if any) is awaited, then closed
    assert open_fds() == fds
    clone.release()
    assert open_fds() == fds


def test_a_clone_given_a_way_uses_it_over_the_channels(tmp_path: Path, template: Template) -> None:
    # vsock= is the template's way: a template saved with its device unplugged has none to restore.
    clone = RestoreClone(template, vsock=PluggedVsock())
    ctx = attached(clone, tmp_path, kernel_channel())
    try:
        assert "-device" not in clone.layout().args[4:]
        clone.launched(time.monotonic() + 60)
        assert [e[0] for e in ctx.events if e[0] == "device_add"] == ["device_add"]
    finally:
        clone.release()


# ---- the vsock device in a snapshot ---------------------------------------------------------------


def test_vsock_in_snapshot_keeps_a_device_that_migrates_and_plugs_one_that_does_not(tmp_path: Path) -> None:
    kept = vsock_in_snapshot(cast(LaunchContext, FakeContext(tmp_path, kernel_channel())))
    plugged = vsock_in_snapshot(cast(LaunchContext, FakeContext(tmp_path, userspace_channel())))
    assert type(kept) is KeptVsock and type(plugged) is PluggedVsock


def test_kept_and_plugged_devices_on_the_command_lines(tmp_path: Path) -> None:
    ctx = FakeContext(tmp_path, kernel_channel())
    lc = cast(LaunchContext, ctx)
    device = ["-device", ctx.channel.device_arg()]
    assert KeptVsock().template_args(lc) == KeptVsock().clone_args(lc) == device
    assert PluggedVsock().template_args(lc) == device and PluggedVsock().clone_args(lc) == []
    KeptVsock().before_save(lc, time.monotonic() + 1)
    KeptVsock().after_restore(lc)
    assert ctx.events == []  # a kept device needs nothing of QEMU
    PluggedVsock().after_restore(lc)
    assert ctx.events == [("device_add", "vhost-vsock-pci", VSOCK_ID, {"bus": HOTPLUG_PORT, "guest-cid": "70002"})]


# ---- save_template and restore_clone over a stand-in MicroVM ---------------------------------------


class FakeVM:
    """What save_template and restore_clone use of MicroVM: start() attaches the launch to a
    fake context and lays it out, as MicroVM.start does, then fails if its maker says so;
    start and stop are recorded among that context's events."""

    def __init__(self, vms: FakeVMs, config: VMConfig, **kwargs: Any) -> None:
        self.vms = vms
        self.config = config
        self.kwargs = kwargs
        self.launch: Launch = kwargs["launch"]
        self.token = secrets.token_hex(16)
        self.ctx = FakeContext(vms.workdir, kernel_channel(), kwargs.get("name", "vm"))
        self.ctx.monitor.migrations = list(vms.migrations)
        vms.made.append(self)

    def start(self) -> FakeVM:
        self.launch.attach(cast(LaunchContext, self.ctx))
        layout = self.launch.layout()
        if layout.ram_file is not None and isinstance(self.launch, SaveTemplate):  # QEMU makes it
            Path(layout.ram_file).parent.mkdir(parents=True, exist_ok=True)
            Path(layout.ram_file).write_bytes(bytes(3 * 4096) + b"guest" + bytes(4091))
        self.ctx.events.append(("start",))
        if self.vms.start_errors:
            raise self.vms.start_errors.pop(0)
        return self

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        self.ctx.events.append(("stop", graceful))

    def write_file(self, remote: str, data: bytes) -> None:
        self.ctx.events.append(("write_file", remote, data))


class FakeVMs:
    """Makes FakeVMs in place of MicroVM: ``start_errors`` are raised by the next starts,
    ``migrations`` is each new VM's monitor's script."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.made: list[FakeVM] = []
        self.start_errors: list[BaseException] = []
        self.migrations: list[tuple[str, str]] = [("completed", "completed")]

    def __call__(self, config: VMConfig, **kwargs: Any) -> FakeVM:
        return FakeVM(self, config, **kwargs)


@pytest.fixture
def vms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeVMs:
    """strategies.MicroVM replaced by FakeVMs (on the kernel path): no seam takes its place."""
    made = FakeVMs(tmp_path)
    monkeypatch.setattr(strategies, "MicroVM", made)
    return made


def test_save_template_boots_saves_and_stops_the_template_vm(tmp_path: Path, vms: FakeVMs) -> None:
    image, host, staging = guest_image(tmp_path), host_report(), tmp_path / "staging"
    token = save_template(VMConfig(memory_mib=64), image, host, staging)
    (vm,) = vms.made
    assert token == vm.token  # the agent's, which every clone says in HELLO
    assert vm.config.image is image and vm.config.memory_mib == 64  # the image it was keyed on
    assert vm.kwargs["name"] == "template" and vm.kwargs["host"] == host
    assert isinstance(vm.launch, SaveTemplate) and vm.launch.ram == staging / "ram"
    assert without_polls(vm.ctx.events) == [
        ("start",),
        ("write_file", "/proc/sys/vm/drop_caches", b"3\n"),  # what is only cache is not saved
        ("disconnect_agent",),
        ("pause",),
        ("set_migration_capabilities", {"x_ignore_shared": True}),
        ("migrate", f"exec:cat > {staging / 'state'}"),
        ("stop", False),  # a template is never powered off gracefully: it is saved
    ]
    assert vm.launch.layout().cmdline == ["init_on_free=1"]  # what the guest frees is zeros
    # Its zero pages are holes: clones copy only the page the guest wrote.
    assert (staging / "ram").read_bytes() == bytes(3 * 4096) + b"guest" + bytes(4091)
    assert (staging / "ram").stat().st_blocks * 512 <= 4096


def test_save_template_that_fails_stops_the_vm(tmp_path: Path, vms: FakeVMs) -> None:
    vms.migrations = [("failed", "Unable to write to command")]
    with pytest.raises(MigrationFailed, match="Unable to write to command"):
        save_template(VMConfig(), guest_image(tmp_path), host_report(), tmp_path / "staging")
    (vm,) = vms.made
    assert ("migrate", f"exec:cat > {tmp_path / 'staging' / 'state'}") in vm.ctx.events
    assert without_polls(vm.ctx.events)[-1] == ("stop", False)


def test_save_template_starts_again_with_a_new_launch_when_the_cid_is_taken(tmp_path: Path, vms: FakeVMs) -> None:
    # Another program holds the guest CID: QEMU exits at once, saying so.
    vms.start_errors = [
        BootError("template: QEMU exited", qemu_stderr="unable to set guest cid: Address already in use")
    ]
    token = save_template(VMConfig(), guest_image(tmp_path), host_report(), tmp_path / "staging")
    first, second = vms.made
    assert second.launch is not first.launch  # a new SaveTemplate for each attempt
    assert token == second.token
    assert ("pause",) not in first.ctx.events and ("pause",) in second.ctx.events  # the one that started is saved
    assert without_polls(second.ctx.events)[-1] == ("stop", False)


def test_restore_clone_starts_a_vm_restoring_the_template(tmp_path: Path, template: Template, vms: FakeVMs) -> None:
    config, host = VMConfig(), host_report()
    vm = cast(FakeVM, restore_clone(config, template, host, name="c1"))
    try:
        assert vms.made == [vm]
        assert vm.config is config and vm.kwargs["name"] == "c1" and vm.kwargs["host"] == host
        assert isinstance(vm.launch, RestoreClone) and vm.launch.template is template
        assert vm.ctx.events == [("start",)]
    finally:
        vm.launch.release()


def test_restore_clone_passes_a_failed_restore_through(tmp_path: Path, template: Template, vms: FakeVMs) -> None:
    broken = TemplateBroken("the template's saved state did not load")
    vms.start_errors = [broken]
    with pytest.raises(TemplateBroken) as info:
        restore_clone(VMConfig(), template, host_report(), name="c1")
    assert info.value is broken and len(vms.made) == 1  # not a taken CID: no second attempt
    vms.made[0].launch.release()


def test_save_template_on_a_file_system_without_holes_is_still_made(
    tmp_path: Path, vms: FakeVMs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_holes(path: Path) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(strategies, "punch_zero_pages", no_holes)
    token = save_template(VMConfig(), guest_image(tmp_path), host_report(), tmp_path / "staging")
    (vm,) = vms.made
    assert token == vm.token and without_polls(vm.ctx.events)[-1] == ("stop", False)
    assert "cannot be made holes" in caplog.text
