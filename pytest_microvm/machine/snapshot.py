"""Snapshot templates and clones: a fresh VM for the price of a restore, not a boot.

Owns everything about snapshots; :mod:`.vm` only offers three hooks (``_layout``,
``_launched``, ``_connected``) that the two subclasses here fill in.

- **Template** (:class:`TemplateVM`): a guest booted once per configuration, probed,
  then quieted: the agent's connection closed, the vsock device unplugged (QEMU 7.2
  cannot migrate ``vhost-user-vsock-pci``), the guest stopped and its device state saved
  with ``migrate exec:cat>state`` and the ``x-ignore-shared`` capability. Guest RAM is a
  shared ``memory-backend-file`` in the template's cache directory, so the RAM is the
  file itself and the state is a few hundred KiB. Templates live in the image cache,
  keyed on everything that makes a snapshot invalid (:func:`template_key`).
- **Clone** (:class:`CloneVM`): the template's RAM copied (only the pages the guest
  touched) into a memfd that QEMU inherits, so no RAM file ever exists by name and none
  can outlive QEMU; QEMU started with ``-incoming defer`` and no vsock, the state loaded
  from a descriptor opened with the RAM (``migrate-incoming fd:``), then a new vsock
  device hot-plugged on the PCIe root port the template has for it (ACPI PCI hotplug),
  with its own backend. The agent, which retries its connection every 10 ms, connects;
  the host sends CLONE (docs/protocol.md: clock, entropy, token) before the probe, and
  each clone has its own vmgenid.
- :class:`Templates`: a clone where the configuration allows one, else (or when restoring
  fails twice) a boot, with a warning that says why.

The pool of clones made ahead is :mod:`.pool`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_microvm.cache import cache_dir, cached_build
from pytest_microvm.client import AgentClient
from pytest_microvm.errors import BootError, ConfigError, GuestError, MicroVMError, ProtocolError
from pytest_microvm.image import GuestImage
from pytest_microvm.image.builder import HOST_ROOT
from pytest_microvm.machine import storage
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import HostReport, choose, detect_host
from pytest_microvm.machine.qemu import Layout, device_args
from pytest_microvm.machine.qmp import MonitorError
from pytest_microvm.machine.vm import MicroVM, QemuArgsHook

log = logging.getLogger(__name__)

TEMPLATE_FORMAT = "1"  # bump when what a template holds or how it is made changes
HOTPLUG_PORT = "microvm-hotplug"  # the PCIe root port the vsock device is plugged into
VSOCK_ID = "microvm-vsock"
VMGENID_ID = "microvm-vmgenid"
SHM_ENV = "MICROVM_SHM_DIR"  # a tmpfs for clones' RAM instead of a memfd (checked for room)
_RESTORE_TIMEOUT = 30.0  # a restore is a fraction of a second; this bounds a stuck one
# After the template's vsock device is gone, before the guest is stopped: longer than the
# kernel's vsock connect timeout (2 s), so a connect request lost with the device times
# out here, once per template, and not in every clone (where it held the agent for 2 s).
# A shorter connect timeout in the agent instead left half-open connections on the host
# when a loaded host answered late.
_SETTLE = 2.5


class SnapshotError(BootError):
    """A template could not be made, or a clone could not be restored from it."""


class TemplateBroken(SnapshotError):
    """The template's files are incomplete or its saved state did not load: it is
    discarded and made again."""


class CannotClone(SnapshotError):
    """This host cannot hold a clone (the tmpfs for its RAM); the template is fine."""


class ShmTooSmall(CannotClone):
    """The tmpfs for clones' RAM has less room than one clone's memory."""


# ---- what a template depends on ------------------------------------------------------


def why_not(config: VMConfig, host: HostReport, *, hooked: bool = False) -> str | None:
    """Why ``config`` cannot be a clone here, or None when it can."""
    if not config.snapshot:
        return "snapshot=False"
    if config.keep:
        return "kept VMs boot (a clone's RAM lives only as long as this process)"
    if config.network:
        return "VMs with network=True boot (their forwarded host ports are their own)"
    if hooked:
        return "a pytest_microvm_qemu_args hook rewrites the QEMU command line"
    if config.rootfs == HOST_ROOT:
        return "the host's / is a mounted 9p share from the first moment, which QEMU cannot migrate"
    if host.qemu is None:
        return "QEMU is not installed"
    if choose(host, config.accel, config.vsock).vsock != "userspace":
        return "clones use the userspace vsock flavour; with kernel vhost-vsock VMs boot"
    return None


def _file_identity(path: Path | None) -> list[Any]:
    if path is None:
        return []
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def template_key(config: VMConfig, image: GuestImage, host: HostReport) -> str:
    """Everything that makes a saved guest unusable if it changes: the QEMU binary and
    version, machine, accelerator, CPU, memory, vCPUs, the image's files, the kernel
    command line, the devices (shares, extra QEMU arguments) and the agent's port."""
    assert host.qemu is not None
    choice = choose(host, config.accel, config.vsock)
    parts = {
        "format": TEMPLATE_FORMAT,
        "qemu": [*_file_identity(Path(host.qemu)), host.qemu_version],
        "machine": "q35",
        "accel": choice.accel,
        # Under KVM the guest runs on the host's CPU (-cpu host) and KVM's view of it: a
        # template from another CPU or host kernel (a cache shared by CI runners) would
        # fault. Under TCG the CPU is QEMU's own model.
        "cpu": _host_cpu() if choice.accel == "kvm" else "qemu-default",
        "vsock": choice.vsock,
        "memory_mib": config.memory_mib,
        "vcpus": config.vcpus,
        "image": [image.key, *_file_identity(image.kernel), *_file_identity(image.initramfs)],
        "root_disk": _file_identity(image.root_disk),
        "cmdline": list(config.kernel_cmdline),
        "qemu_args": list(config.qemu_args),
        # Only how many: their tags are share0..N, and their host paths and modes live in
        # QEMU's fsdev, not in the guest or the saved state (and they are mounted after
        # the restore), so a test's own tmp_path share still clones from one template.
        "shares": len(config.share_list()),
        "port": config.port,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _host_cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    first = cpuinfo.split("\n\n")[0]  # one processor's entry: model, flags, microcode
    wanted = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode", "flags")
    lines = [line for line in first.splitlines() if line.split(":")[0].strip() in wanted]
    return hashlib.sha256("\n".join([os.uname().release, *lines]).encode()).hexdigest()[:16]


def _snapshot_devices(vmgenid: str) -> list[str]:
    """Devices a template and its clones have in common beyond the config's: the root port
    the vsock device is hot-plugged into, and the vmgenid that tells clones apart."""
    return [
        *device_args("pcie-root-port", id=HOTPLUG_PORT, bus="pcie.0", chassis=1),
        *device_args("vmgenid", id=VMGENID_ID, guid=vmgenid),
    ]


# ---- templates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A saved guest in the cache: its RAM file, device state, and how to reach its agent."""

    directory: Path
    key: str
    id: str  # this making of the template: a remade one under the same key has another
    token: str  # the template's token: every clone's agent says it in HELLO, before CLONE
    memory_mib: int

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @classmethod
    def load(cls, directory: Path) -> Template:
        """The template in ``directory``; TemplateBroken if any part is missing or wrong."""
        try:
            meta = json.loads((directory / "template.json").read_text())
            template = cls(directory, str(meta["key"]), str(meta["id"]), str(meta["token"]), int(meta["memory_mib"]))
            ram_size, state_size = template.ram.stat().st_size, template.state.stat().st_size
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateBroken(f"snapshot template {directory.name} is incomplete: {exc}") from exc
        if ram_size != template.memory_mib << 20 or state_size == 0:
            raise TemplateBroken(
                f"snapshot template {directory.name} is damaged: RAM {ram_size} bytes for "
                f"{template.memory_mib} MiB, device state {state_size} bytes"
            )
        return template

    def current_id(self) -> str | None:
        """The id of the template now in this directory (None: none there)."""
        try:
            return str(json.loads((self.directory / "template.json").read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def touch(self) -> None:
        """Record a use (template.json's mtime, at most once a day) for forget_unused."""
        meta = self.directory / "template.json"
        with contextlib.suppress(OSError):
            if time.time() - meta.stat().st_mtime > 86400:
                os.utime(meta)

    def discard(self) -> None:
        """Remove it from the cache; the next use makes a new one. Only this making of it:
        another process may already have remade it (then that one stays)."""
        _discard(self.directory, self.id)


def _discard(directory: Path, template_id: str | None) -> None:
    with FileLock(str(directory) + ".lock"):
        try:
            found = json.loads((directory / "template.json").read_text()).get("id")
        except (OSError, ValueError, AttributeError):
            found = None
        if template_id is None or found in (None, template_id):
            shutil.rmtree(directory, ignore_errors=True)


def templates_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "templates"


class _MigrationFailed(SnapshotError):
    """QEMU ended a migration with status failed: the stream itself was refused."""


class _SnapshotVM(MicroVM):
    """What templates and clones share: waiting for a migration to end."""

    def _await_migration(self, deadline: float, what: str) -> None:
        assert self.monitor is not None
        while True:
            self._raise_if_dead(SnapshotError)
            info = self.monitor.command("query-migrate")["return"]
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise self._failure(f"{what} failed: {info.get('error-desc', status)}", _MigrationFailed)
            if time.monotonic() > deadline:
                raise self._failure(f"{what} did not finish (status {status})", SnapshotError)
            time.sleep(0.005)


class TemplateVM(_SnapshotVM):
    """Boots the guest a template is saved from (see the module docstring)."""

    mounts_shares = False  # a mounted 9p share blocks migration; clones mount after restore

    def __init__(self, config: VMConfig, ram: Path, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._ram = ram

    def _layout(self, vsock_device: tuple[str, dict[str, str]]) -> Layout:
        driver, props = vsock_device
        return Layout(
            args=[*_snapshot_devices("auto"), *device_args(driver, **props, id=VSOCK_ID, bus=HOTPLUG_PORT)],
            ram_file=str(self._ram),
        )

    def save(self, state: Path, timeout: float = 20.0) -> None:
        """Quiet the guest, unplug its vsock, stop it and write its device state to ``state``."""
        assert self.monitor is not None and self._client is not None and self._listener is not None
        deadline = time.monotonic() + timeout
        # No listener first: the agent's reconnects are refused, so no connection is open
        # in the guest when it is saved. Then the connection it has.
        self._listener.close()
        self._client.close()
        self.monitor.command("device_del", id=VSOCK_ID)
        while VSOCK_ID in self._peripherals():  # the guest ejects it (ACPI) when it gets to it
            self._raise_if_dead(SnapshotError)
            if time.monotonic() > deadline:
                raise self._failure(
                    f"the guest did not release its vsock device within {timeout:.0f}s: cloning needs a kernel "
                    "with PCIEPORTBUS, HOTPLUG_PCI and HOTPLUG_PCI_ACPI (Debian's and the source kernel have them)",
                    SnapshotError,
                )
            time.sleep(0.01)
        time.sleep(_SETTLE)
        self.monitor.command("stop")
        self.monitor.command(
            "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}]
        )
        self.monitor.command("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
        self._await_migration(deadline, "saving the template")

    def _peripherals(self) -> set[str]:
        assert self.monitor is not None
        return {p["name"] for p in self.monitor.command("qom-list", path="/machine/peripheral")["return"]}


def make_template(
    config: VMConfig, image: GuestImage, host: HostReport, key: str, cache: Path | None = None
) -> Template:
    """The template for ``key``, made now unless the cache has a sound one (one maker
    across processes: the others wait on its lock, then use it)."""
    final = templates_dir(cache) / key
    try:
        return Template.load(final)
    except TemplateBroken:
        pass
    if final.exists():
        # Damaged (a crash while it was written, a full disk)? Judged again under the lock:
        # another process may have just remade it.
        with FileLock(str(final) + ".lock"):
            try:
                return Template.load(final)
            except TemplateBroken:
                shutil.rmtree(final, ignore_errors=True)

    def build(staging: Path) -> None:
        started = time.monotonic()
        vm = TemplateVM(config.with_(image=image), staging / "ram", host=host, name="template")
        try:
            vm.start()
            vm.save(staging / "state")
        finally:
            vm.stop(graceful=False)
        meta = {
            "key": key,
            "id": secrets.token_hex(8),
            "token": vm.token,
            "memory_mib": config.memory_mib,
            "made": time.time(),
        }
        (staging / "template.json").write_text(json.dumps(meta, indent=2) + "\n")
        for part in ("ram", "state", "template.json"):  # whole on disk before it has its name
            with open(staging / part, "rb+") as f:
                os.fsync(f.fileno())
        Template.load(staging)  # what a user of it would check
        log.info("made snapshot template %s in %.2fs", key, time.monotonic() - started)

    if cached_build(final, build):
        forget_unused(final.parent)
    return Template.load(final)


UNUSED_DAYS = 14  # a template no clone came from for this long is removed when another is made


def forget_unused(directory: Path, days: float = UNUSED_DAYS) -> list[str]:
    """Remove the templates in ``directory`` unused for ``days`` (keys change with every
    QEMU upgrade and image rebuild, and each template holds its guest's touched RAM).
    Returns the keys removed. Use is recorded by :meth:`Template.touch`."""
    cutoff = time.time() - days * 86400
    gone = []
    for meta in directory.glob("*/template.json"):
        try:
            unused = meta.stat().st_mtime < cutoff
        except OSError:
            continue
        if unused:
            _discard(meta.parent, None)
            gone.append(meta.parent.name)
    if gone:
        log.info("removed %d snapshot template(s) unused for %g days: %s", len(gone), days, ", ".join(gone))
    return gone


# ---- clones ----------------------------------------------------------------------------


def ram_file(template: Template) -> tuple[int, int]:
    """(a nameless file for a clone's RAM, sized but not filled; the template's RAM file,
    open for reading): :func:`_copy_extents` fills the one from the other.

    A memfd, like a boot's RAM: it never has a name, so nothing is left behind whatever
    happens to this process, and it lives as long as a descriptor or mapping of it
    (QEMU's, the vsock backend's). ``$MICROVM_SHM_DIR`` puts it on that tmpfs instead
    (O_TMPFILE: nameless too), checked for room first. Only the template's data extents
    are copied: the rest are holes, which read as the zeros the guest never wrote.
    """
    where = os.environ.get(SHM_ENV)
    try:
        dst = _tmpfile(Path(where), template.memory_mib) if where else os.memfd_create("clone-ram", os.MFD_CLOEXEC)
    except OSError as exc:
        raise SnapshotError(f"cannot make a file for clone RAM ({exc})") from exc
    try:
        src = os.open(template.ram, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(dst)
        raise SnapshotError(f"cannot read snapshot template {template.key}'s RAM ({exc})") from exc
    try:
        os.ftruncate(dst, os.fstat(src).st_size)
    except BaseException as exc:
        os.close(dst)
        os.close(src)
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot size the file for clone RAM ({exc})") from exc
        raise
    return dst, src


def _tmpfile(where: Path, memory_mib: int) -> int:
    try:
        st = os.statvfs(where)
    except OSError as exc:
        raise CannotClone(f"cannot use {where} for clone RAM ({exc}): fix or unset {SHM_ENV}") from exc
    free = st.f_bavail * st.f_frsize
    if free < memory_mib << 20:
        raise ShmTooSmall(
            f"{where} has {free >> 20} MiB free, a clone needs {memory_mib} MiB "
            f"(its guest memory): enlarge it (mount -o remount,size=... {where}) or unset {SHM_ENV}"
        )
    try:
        return os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CannotClone(
            f"cannot make an unnamed file (O_TMPFILE) in {where} for clone RAM ({exc}): fix or unset {SHM_ENV}"
        ) from exc


def _copy_extents(src: int, dst: int, size: int) -> None:
    os.ftruncate(dst, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        os.lseek(dst, start, os.SEEK_SET)
        left = end - start
        offset = start
        while left:
            sent = os.sendfile(dst, src, offset, min(left, 1 << 30))
            if sent == 0:
                raise SnapshotError("the template's RAM file is shorter than it says")
            offset += sent
            left -= sent
        pos = end


class CloneVM(_SnapshotVM):
    """A VM restored from a :class:`Template` (see the module docstring)."""

    def __init__(self, config: VMConfig, template: Template, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.template = template
        self.token = template.token  # until CLONE gives the guest its own
        self.vmgenid = str(uuid.uuid4())
        self.restore_seconds: float | None = None
        self._ram_fd: int | None = None
        self._state_fd: int | None = None
        self._filling: threading.Thread | None = None
        self._fill_error: BaseException | None = None
        self._vsock_device: tuple[str, dict[str, str]] | None = None

    def start(self) -> CloneVM:
        try:
            super().start()
        except (SnapshotError, ConfigError):
            raise
        except (GuestError, ProtocolError) as exc:
            # Anything else that keeps a clone from coming up (an agent that refused
            # CLONE, a probe that failed) is the clone's problem: the caller boots instead.
            detail = exc if isinstance(exc, GuestError) else None
            raise SnapshotError(
                f"the clone did not come up: {_first_line(exc)}",
                console_tail=detail.console_tail if detail else "",
                qemu_stderr=detail.qemu_stderr if detail else "",
            ) from exc
        return self

    def _layout(self, vsock_device: tuple[str, dict[str, str]]) -> Layout:
        self._vsock_device = vsock_device
        self._ram_fd, src = ram_file(self.template)
        try:
            # The state goes with the RAM it was saved with: both are open before we check
            # that the template was not remade meanwhile (another process, a broken one).
            self._state_fd = os.open(self.template.state, os.O_RDONLY | os.O_CLOEXEC)
            if self.template.current_id() != self.template.id:
                raise SnapshotError(f"snapshot template {self.template.key} was remade while this clone started")
        except OSError as exc:
            os.close(src)
            raise SnapshotError(f"cannot read snapshot template {self.template.key}'s state ({exc})") from exc
        except BaseException:
            os.close(src)
            raise
        # The RAM is filled while QEMU starts: QEMU maps the file at once but reads none of
        # it before the device state loads (_launched waits for the copy first).
        self._filling = threading.Thread(
            target=self._fill, args=(src, self._ram_fd), name=f"{self.name}-ram", daemon=True
        )
        self._filling.start()
        return Layout(
            args=[*_snapshot_devices(self.vmgenid), "-incoming", "defer"],
            ram_file=f"/proc/self/fd/{self._ram_fd}",
            pass_fds=(self._ram_fd,),
        )

    def _fill(self, src: int, dst: int) -> None:
        try:
            _copy_extents(src, dst, os.fstat(src).st_size)
        except BaseException as exc:  # handed to the starting thread in _await_fill
            self._fill_error = exc
        finally:
            os.close(src)

    def _await_fill(self) -> None:
        if self._filling is not None:
            self._filling.join()
            self._filling = None
        if self._ram_fd is not None:  # QEMU has its own descriptor of the file
            os.close(self._ram_fd)
            self._ram_fd = None
        if self._fill_error is not None:
            raise self._failure(f"copying the template's RAM failed: {self._fill_error}", SnapshotError)

    def _launched(self, deadline: float) -> None:
        assert self.monitor is not None and self._vsock_device is not None and self._state_fd is not None
        started = time.monotonic()
        until = min(deadline, started + _RESTORE_TIMEOUT)
        try:
            self._connect_monitor(until)
            self._await_fill()
            self.monitor.command(
                "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}]
            )
            self.monitor.send_fd("microvm-state", self._state_fd)
            os.close(self._state_fd)
            self._state_fd = None
            self.monitor.command("migrate-incoming", uri="fd:microvm-state")
            self._await_restore(until)
            driver, props = self._vsock_device
            self.monitor.command("device_add", driver=driver, id=VSOCK_ID, bus=HOTPLUG_PORT, **props)
            self.monitor.command("cont")
        except MonitorError as exc:
            raise self._failure(f"restoring the snapshot failed: {exc}", SnapshotError) from exc
        self.restore_seconds = time.monotonic() - started

    def _await_restore(self, until: float) -> None:
        try:
            self._await_migration(until, "restoring the snapshot")
        except (SnapshotError, MonitorError) as exc:
            # QEMU exits on a state it cannot load (its monitor drops): let it say why.
            self._wait_exit(time.monotonic() + 2.0)
            stderr = self.qemu.stderr() if self.qemu else ""
            # Only the state's own failure condemns the template, which other processes
            # share: not a QEMU that was killed, nor a deadline missed under load.
            broken = isinstance(exc, _MigrationFailed) or "load of migration failed" in stderr
            kind = TemplateBroken if broken else SnapshotError
            raise self._failure(f"the template's saved state did not load: {_first_line(exc)}", kind) from exc

    def _connect_monitor(self, until: float) -> None:
        assert self.monitor is not None
        # QEMU makes its monitor socket a moment after it starts, and listens on it a moment
        # after that: knock first (a refused knock costs nothing), then speak QMP.
        while True:
            self._raise_if_dead(SnapshotError)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as knock:
                try:
                    knock.connect(str(self.monitor.path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > until:
                        raise MonitorError(f"QEMU did not open its monitor at {self.monitor.path}") from None
            time.sleep(0.002)
        self.monitor.connect()

    def _await_agent(self, deadline: float, *, limit: float | None = None) -> AgentClient:
        # A restored agent connects within a second of the hot-plug; one that has not after
        # _RESTORE_TIMEOUT never will (a kernel that missed the hot-plug): fail as a
        # snapshot problem, which the caller answers with a boot, not a boot-timeout wait.
        try:
            return super()._await_agent(min(deadline, time.monotonic() + _RESTORE_TIMEOUT), limit=_RESTORE_TIMEOUT)
        except SnapshotError:
            raise
        except BootError as exc:
            raise SnapshotError(
                f"{_first_line(exc)} after the restore", console_tail=exc.console_tail, qemu_stderr=exc.qemu_stderr
            ) from exc

    def _connected(self, client: AgentClient) -> None:
        token = secrets.token_hex(16)
        client.become_clone(token)
        self.token = token  # the agent says this one from now on (a reconnect, microvm attach)

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        try:
            super().stop(graceful=graceful, timeout=timeout, keep=keep)
        finally:
            with contextlib.suppress(MicroVMError):
                self._await_fill()  # a start that failed before the restore
            if self._state_fd is not None:
                os.close(self._state_fd)
                self._state_fd = None


# ---- choosing: a clone when possible ------------------------------------------------------


class Templates:
    """The templates one process uses: made on first need, repaired once, then given up on."""

    def __init__(self, cache: str | os.PathLike[str] | None = None) -> None:
        self.cache = cache  # the cache root's override; None: the default, resolved at use
        self._lock = threading.Lock()
        self._broken: dict[str, str] = {}  # key -> why this process boots instead
        self._warned: set[str] = set()

    def warn_once(self, why: str) -> None:
        with self._lock:
            if why in self._warned:
                return
            self._warned.add(why)
        log.warning("booting instead of cloning: %s", why)

    def start(
        self,
        config: VMConfig,
        *,
        host: HostReport | None = None,
        qemu_args_hook: QemuArgsHook | None = None,
        name: str = "vm",
    ) -> MicroVM:
        """A started VM for ``config``: a clone when possible, else a boot (see why_not).

        A ``qemu_args_hook`` could make a clone's command line differ from its template's,
        so a VM with one always boots: pass None when the hook would change nothing.
        """
        host = host or detect_host()
        reason = why_not(config, host, hooked=qemu_args_hook is not None)
        if reason is not None:
            log.debug("%s boots: %s", name, reason)
            return MicroVM(config, host=host, qemu_args_hook=qemu_args_hook, name=name).start()
        image = storage.image_for(config)
        config = config.with_(image=image)
        key = template_key(config, image, host)
        for attempt in (1, 2):
            if key in self._broken:
                break
            try:
                template = make_template(config, image, host, key, cache_dir(self.cache))
            except MicroVMError as exc:
                self._give_up(key, f"the snapshot template could not be made: {_first_line(exc)}")
                break
            try:
                clone = CloneVM(config, template, host=host, name=name).start()
                template.touch()
                return clone
            except CannotClone as exc:
                self._give_up(key, str(exc))
            except SnapshotError as exc:
                # A template whose state does not load (corrupt, or a QEMU changed in place)
                # is remade; other faults (a hot-plug refused, an agent that never came) are
                # tried once more. Only the state's own failure discards it: other processes
                # share the template.
                broken = isinstance(exc, TemplateBroken)
                if broken:
                    template.discard()
                if attempt == 2:
                    self._give_up(key, f"restoring its snapshot failed twice: {_first_line(exc)}")
                else:
                    again = "making it again" if broken else "trying once more"
                    log.warning("restoring snapshot template %s failed (%s); %s", key, _first_line(exc), again)
        self.warn_once(self._broken[key])
        return MicroVM(config, host=host, qemu_args_hook=qemu_args_hook, name=name).start()

    def _give_up(self, key: str, why: str) -> None:
        with self._lock:
            self._broken[key] = why


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


__all__ = [
    "CannotClone",
    "CloneVM",
    "ShmTooSmall",
    "SnapshotError",
    "Template",
    "TemplateBroken",
    "TemplateVM",
    "Templates",
    "make_template",
    "template_key",
    "why_not",
]
