"""Snapshot templates and clones (machine/snapshot.py) without a VM: the template key,
when a VM may be a clone, the sparse RAM copy into an unnamed tmpfs file, the choice
between clone and boot (with fakes for the template maker, CloneVM and MicroVM), and
the pool that makes clones ahead on its own thread (with a fake Templates).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.image import GuestImage
from pytest_microvm.machine import snapshot
from pytest_microvm.machine.config import Share
from pytest_microvm.machine.host import Capability, HostReport
from pytest_microvm.machine.snapshot import (
    SHM_ENV,
    ClonePool,
    ShmTooSmall,
    SnapshotError,
    Template,
    TemplateBroken,
    Templates,
    _copy_extents,
    make_template,
    ram_copy,
    template_key,
    why_not,
)
from pytest_microvm.machine.vm import Runstate

YES, NO = Capability(True, "usable"), Capability(False, "missing")
MIB = 1 << 20


def host_report(*, kvm: bool = False, vhost_vsock: bool = False, qemu: str | None = sys.executable) -> HostReport:
    """A host that allows cloning by default: userspace vsock (no vhost-vsock), a QEMU
    path that exists (the key stats it)."""
    return HostReport(kvm=YES if kvm else NO, vhost_vsock=YES if vhost_vsock else NO, qemu=qemu, qemu_version="7.2.0")


def guest_image(root: Path) -> GuestImage:
    """An image of small files (the key stats them; nothing boots them)."""
    directory = root / "image"
    directory.mkdir(exist_ok=True)
    (directory / "vmlinux").write_bytes(b"kernel" * 100)
    (directory / "initramfs.cpio").write_bytes(b"initramfs" * 100)
    return GuestImage(
        directory=directory,
        kernel=directory / "vmlinux",
        initramfs=directory / "initramfs.cpio",
        pvh=True,
        kernel_release="6.1.0-test",
        agent_version="test",
        modules=(),
        key="imagekey0123",
        module_groups=("9p", "blk", "overlay"),
    )


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)


# ---- template_key ------------------------------------------------------------------------


def test_template_key_is_stable_for_the_same_inputs(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    key = template_key(VMConfig(), image, host)
    assert key == template_key(VMConfig(), image, host)
    assert len(key) == 20 and int(key, 16) >= 0
    # What does not change the saved guest does not change the key.
    assert template_key(VMConfig(boot_timeout=5.0), image, host) == key


def test_template_key_changes_with_everything_a_snapshot_depends_on(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    share = tmp_path / "share"
    share.mkdir()
    base = VMConfig()
    key = template_key(base, image, host)
    variants = {
        "qemu_version": template_key(base, image, dataclasses.replace(host, qemu_version="8.0.0")),
        "accel": template_key(base, image, host_report(kvm=True)),
        "memory_mib": template_key(base.with_(memory_mib=512), image, host),
        "vcpus": template_key(base.with_(vcpus=2), image, host),
        "kernel_cmdline": template_key(base.with_(kernel_cmdline=("quiet",)), image, host),
        "qemu_args": template_key(base.with_(qemu_args=("-no-reboot",)), image, host),
        "shares": template_key(base.with_(shares={"/src": share}), image, host),
        "readonly share": template_key(base.with_(shares={"/src": Share(share, readonly=True)}), image, host),
        "port": template_key(base.with_(port=5000), image, host),
        "image key": template_key(base, dataclasses.replace(image, key="otherimage"), host),
    }
    assert all(v != key for v in variants.values()), {k: v for k, v in variants.items() if v == key}
    assert len(set(variants.values())) == len(variants)  # and each differently


def test_template_key_changes_when_the_kernel_file_changes(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    key = template_key(VMConfig(), image, host)
    image.kernel.write_bytes(b"a rebuilt kernel, longer than the first one" * 100)  # size and mtime
    rebuilt = template_key(VMConfig(), image, host)
    assert rebuilt != key
    st = image.kernel.stat()
    os.utime(image.kernel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # mtime alone
    touched = template_key(VMConfig(), image, host)
    assert touched not in (key, rebuilt)


# ---- why_not ---------------------------------------------------------------------------------


def test_why_not_allows_a_plain_config_on_a_userspace_vsock_host() -> None:
    assert why_not(VMConfig(), host_report()) is None
    assert why_not(VMConfig(), host_report(kvm=True)) is None  # KVM without vhost-vsock: userspace
    # Forcing userspace on a host that has kernel vhost-vsock allows cloning too.
    assert why_not(VMConfig(vsock="userspace"), host_report(kvm=True, vhost_vsock=True)) is None


@pytest.mark.parametrize(
    ("config", "host", "hooked", "cause"),
    [
        (VMConfig(snapshot=False), host_report(), False, "snapshot=False"),
        (VMConfig(keep=True), host_report(), False, "kept"),
        (VMConfig(network=True), host_report(), False, "network=True"),
        (VMConfig(), host_report(), True, "pytest_microvm_qemu_args hook"),
        (VMConfig(), host_report(qemu=None), False, "QEMU is not installed"),
        (VMConfig(vsock="kernel"), host_report(kvm=True, vhost_vsock=True), False, "kernel vhost-vsock"),
        (VMConfig(accel="kvm"), host_report(kvm=True, vhost_vsock=True), False, "kernel vhost-vsock"),  # auto picks it
    ],
)
def test_why_not_names_the_cause(config: VMConfig, host: HostReport, hooked: bool, cause: str) -> None:
    reason = why_not(config, host, hooked=hooked)
    assert reason is not None and cause in reason


# ---- the sparse RAM copy ---------------------------------------------------------------------


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> bytes:
    """A file of ``size`` bytes with data only at the given offsets; returns its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def test_copy_extents_copies_the_data_and_keeps_the_holes(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    content = _sparse_file(
        src_path, size, {0: os.urandom(4096), 3 * MIB: os.urandom(64 * 1024), size - 4096: os.urandom(4096)}
    )
    assert _allocated(src_path) < MIB, "tmp_path's file system does not keep holes"
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _copy_extents(src, dst, size)
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == content
    assert _allocated(dst_path) < MIB  # 72 KiB of data: the 8 MiB are not all written


def test_copy_extents_of_a_file_without_data_is_all_zeros(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    _sparse_file(src_path, size, {})
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _copy_extents(src, dst, size)
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == bytes(size)
    assert _allocated(dst_path) < MIB


# ---- ram_copy ----------------------------------------------------------------------------------


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory that takes O_TMPFILE (tmp_path, else one in /dev/shm), as MICROVM_SHM_DIR."""
    where = tmp_path / "shm"
    where.mkdir()
    made = None
    try:
        os.close(os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        where = made = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="microvm-test-"))
    monkeypatch.setenv(SHM_ENV, str(where))
    try:
        yield where
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _template(tmp_path: Path, memory_mib: int, chunks: dict[int, bytes]) -> tuple[Template, bytes]:
    directory = tmp_path / "template"
    directory.mkdir()
    template = Template(directory, "key", "token", memory_mib)
    return template, _sparse_file(template.ram, memory_mib * MIB, chunks)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_ram_copy_is_an_unnamed_file_holding_the_template_ram(tmp_path: Path, shm: Path) -> None:
    template, content = _template(tmp_path, 8, {0: os.urandom(4096), 5 * MIB: os.urandom(8192)})
    before = set(os.listdir(shm))
    fd = ram_copy(template)
    try:
        # O_TMPFILE: Linux shows "<dir>/#<inode> (deleted)"; the file has no link anywhere.
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert link.startswith(f"{shm}/#") and link.endswith(" (deleted)"), link
        assert os.fstat(fd).st_nlink == 0
        assert set(os.listdir(shm)) == before
        assert os.fstat(fd).st_size == len(content)
        assert os.pread(fd, len(content) + 1, 0) == content
    finally:
        os.close(fd)


def test_ram_copy_refuses_a_tmpfs_too_small_for_the_guest(
    tmp_path: Path, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = Template(tmp_path, "key", "token", 256)  # no RAM file: refused before it is read
    monkeypatch.setattr(
        "pytest_microvm.machine.snapshot.os.statvfs", lambda path: SimpleNamespace(f_bavail=10, f_frsize=MIB)
    )
    fds = _open_fds()
    with pytest.raises(ShmTooSmall) as info:
        ram_copy(template)
    assert isinstance(info.value, SnapshotError)
    message = str(info.value)
    assert "has 10 MiB free" in message and "needs 256 MiB" in message
    assert str(shm) in message and "MICROVM_SHM_DIR" in message
    assert _open_fds() == fds


def test_ram_copy_of_a_missing_shm_dir_is_a_snapshot_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template, _ = _template(tmp_path, 8, {})
    monkeypatch.setenv(SHM_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SnapshotError, match="nowhere"):
        ram_copy(template)


def test_ram_copy_of_a_template_without_its_ram_is_a_snapshot_error_and_leaks_nothing(
    tmp_path: Path, shm: Path
) -> None:
    template, _ = _template(tmp_path, 8, {})
    template.ram.unlink()
    fds = _open_fds()
    try:
        with pytest.raises(SnapshotError):
            ram_copy(template)
    finally:
        assert _open_fds() == fds  # the unnamed file was closed


# ---- Template on disk ------------------------------------------------------------------------


def test_make_template_finds_a_saved_one_without_booting(tmp_path: Path) -> None:
    directory = snapshot.templates_dir(tmp_path) / "somekey"
    directory.mkdir(parents=True)
    (directory / "template.json").write_text('{"key": "somekey", "token": "tok", "memory_mib": 128}')
    found = make_template(VMConfig(), guest_image(tmp_path), host_report(), "somekey", tmp_path)
    assert found == Template(directory, "somekey", "tok", 128)
    assert found.ram == directory / "ram" and found.state == directory / "state"
    found.discard()
    assert not directory.exists()


# ---- Templates.start: a clone when possible, else a boot -----------------------------------------


class FakeTemplate:
    def __init__(self, key: str) -> None:
        self.key = key
        self.discarded = 0

    def discard(self) -> None:
        self.discarded += 1


class FakeVM:
    """What Templates.start and ClonePool use of a started VM."""

    def __init__(self, name: str, kind: str, config: VMConfig | None = None, **kwargs: Any) -> None:
        self.name = name
        self.made_as = name
        self.kind = kind
        self.config = config
        self.kwargs = kwargs
        self.runstate = Runstate.RUNNING
        self.stops: list[bool] = []

    def rename(self, name: str) -> None:
        self.name = name

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        self.stops.append(graceful)
        self.runstate = Runstate.STOPPED


class Fakes:
    """Stands in for make_template, CloneVM and MicroVM in the snapshot module."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, image: GuestImage) -> None:
        self.templates: list[FakeTemplate] = []
        self.clones: list[FakeVM] = []
        self.boots: list[FakeVM] = []
        self.restores: list[BaseException | None] = []  # what each CloneVM.start does, in order
        self.make_error: BaseException | None = None
        fakes = self

        def make(config: VMConfig, image: GuestImage, host: HostReport, key: str, cache: Path | None = None) -> Any:
            if fakes.make_error is not None:
                raise fakes.make_error
            fakes.templates.append(FakeTemplate(key))
            return fakes.templates[-1]

        class Clone(FakeVM):
            def __init__(self, config: VMConfig, template: FakeTemplate, **kwargs: Any) -> None:
                super().__init__(kwargs.pop("name", "vm"), "clone", config, template=template, **kwargs)
                fakes.clones.append(self)

            def start(self) -> FakeVM:
                outcome = fakes.restores.pop(0)
                if outcome is not None:
                    raise outcome
                return self

        class Boot(FakeVM):
            def __init__(self, config: VMConfig, **kwargs: Any) -> None:
                super().__init__(kwargs.pop("name", "vm"), "boot", config, **kwargs)
                fakes.boots.append(self)

            def start(self) -> FakeVM:
                return self

        monkeypatch.setattr(snapshot, "make_template", make)
        monkeypatch.setattr(snapshot, "CloneVM", Clone)
        monkeypatch.setattr(snapshot, "MicroVM", Boot)
        monkeypatch.setattr("pytest_microvm.machine.snapshot.storage.image_for", lambda config: image)


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    return Fakes(monkeypatch, guest_image(tmp_path))


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _start(templates: Templates, config: VMConfig | None = None, **kwargs: Any) -> FakeVM:
    return cast(FakeVM, templates.start(config or VMConfig(), host=host_report(), **kwargs))


def test_a_restore_that_fails_once_remakes_the_template_and_clones(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fakes.restores = [TemplateBroken("the state file is corrupt"), None]
    vm = _start(Templates(tmp_path), name="t1")
    assert vm.kind == "clone" and vm.name == "t1" and vm is fakes.clones[-1]
    assert vm.config is not None and vm.config.image is not None and vm.config.image.key == "imagekey0123"
    assert [t.discarded for t in fakes.templates] == [1, 0]  # the broken one discarded, the remade one kept
    assert len(fakes.clones) == 2 and not fakes.boots
    assert len(_warnings(caplog, "making it again")) == 1
    assert not _warnings(caplog, "booting instead of cloning")


def test_a_fault_outside_the_template_keeps_it_and_tries_once_more(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fakes.restores = [SnapshotError("the hot-plug was refused"), None]
    vm = _start(Templates(tmp_path), name="t1")
    assert vm.kind == "clone"
    assert [t.discarded for t in fakes.templates] == [0, 0]  # shared with other processes: kept
    assert len(_warnings(caplog, "trying once more")) == 1


def test_a_restore_that_fails_twice_boots_and_says_why_once(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fakes.restores = [TemplateBroken("restore broke\ndetails"), TemplateBroken("restore broke again\ndetails")]
    templates = Templates(tmp_path)
    vm = _start(templates, name="t1")
    assert vm.kind == "boot" and vm.name == "t1"
    assert [t.discarded for t in fakes.templates] == [1, 1]
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1
    assert "restoring its snapshot failed twice: restore broke again" in warned[0]
    assert "details" not in warned[0]  # the first line of the error only

    # The same key again: a boot at once, no third template, no second warning.
    again = _start(templates, name="t2")
    assert again.kind == "boot" and again.name == "t2"
    assert len(fakes.templates) == 2 and len(fakes.clones) == 2
    assert len(_warnings(caplog, "booting instead of cloning")) == 1

    # Another configuration (another key) is not given up on.
    fakes.restores = [None]
    other = _start(templates, VMConfig(memory_mib=512), name="t3")
    assert other.kind == "clone" and len(fakes.templates) == 3


def test_a_tmpfs_too_small_boots_at_once_and_keeps_the_template(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fakes.restores = [ShmTooSmall("/dev/shm has 10 MiB free, a clone needs 256 MiB")]
    vm = _start(Templates(tmp_path))
    assert vm.kind == "boot"
    assert len(fakes.templates) == 1 and fakes.templates[0].discarded == 0
    assert len(fakes.clones) == 1 and not fakes.restores
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1 and "a clone needs 256 MiB" in warned[0]


def test_a_template_that_cannot_be_made_boots_and_is_not_tried_again(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fakes.make_error = SnapshotError("the guest did not release its vsock device")
    templates = Templates(tmp_path)
    assert _start(templates).kind == "boot"
    fakes.make_error = AssertionError("make_template called again for a key given up on")
    assert _start(templates).kind == "boot"
    assert not fakes.clones
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1 and "could not be made: the guest did not release" in warned[0]


def test_a_config_that_cannot_be_a_clone_boots_without_a_template(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pytest_microvm.machine.snapshot")
    hook = cast(Any, lambda config, argv: argv)
    vm = _start(Templates(tmp_path), VMConfig(snapshot=False), name="b", qemu_args_hook=hook)
    assert vm.kind == "boot" and vm.name == "b" and vm.kwargs["qemu_args_hook"] is hook
    assert not fakes.templates and not fakes.clones
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the user asked for it: no warning


# ---- ClonePool -----------------------------------------------------------------------------------


class FakeTemplates:
    """Templates.start as ClonePool calls it: records each call, hands out FakeVMs."""

    def __init__(self, fail_pooled: bool = False) -> None:
        self.fail_pooled = fail_pooled
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self.vms: list[FakeVM] = []

    def start(
        self,
        config: VMConfig,
        *,
        host: HostReport | None = None,
        name: str = "vm",
        qemu_args_hook: Any = None,
    ) -> FakeVM:
        with self.lock:
            self.calls.append({"config": config, "name": name, "hooked": qemu_args_hook is not None})
        if self.fail_pooled and name == "pooled":
            raise SnapshotError("no template\nmore")
        vm = FakeVM(name, "clone", config)
        with self.lock:
            self.vms.append(vm)
        return vm

    def names(self) -> list[str]:
        with self.lock:
            return [c["name"] for c in self.calls]


@pytest.fixture
def pools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ClonePool]]:
    """Makes pools over a fake Templates on a host that allows cloning; closes them all."""
    image = guest_image(tmp_path)
    monkeypatch.setattr(snapshot, "detect_host", lambda: host_report())
    monkeypatch.setattr("pytest_microvm.machine.snapshot.storage.image_for", lambda config: image)
    made: list[ClonePool] = []

    def make(templates: FakeTemplates, size: int = 1) -> ClonePool:
        made.append(ClonePool(cast(Templates, templates), size))
        return made[-1]

    yield make
    for pool in made:
        pool.close()
        assert pool._thread is None or not pool._thread.is_alive()


def _ready(pool: ClonePool) -> int:
    with pool._cond:
        return sum(len(slot.ready) for slot in pool._slots)


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "microvm-clone-pool"]


def test_pool_makes_one_ahead_and_hands_it_out_renamed(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    first = cast(FakeVM, pool.take(VMConfig(), name="first"))
    assert first.made_as == "first" and first.kind == "clone"  # made inline: nothing was ready
    thread = pool._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    eventually(lambda: _ready(pool) == 1)
    assert sorted(fake.names()) == ["first", "pooled"]
    assert all(c["config"].image is not None for c in fake.calls)  # the slot's config names its image

    second = cast(FakeVM, pool.take(VMConfig(), name="second"))
    assert second.made_as == "pooled" and second.name == "second"
    assert "second" not in fake.names()  # no inline start for it
    eventually(lambda: _ready(pool) == 1)  # and the next one is made ahead
    assert fake.names().count("pooled") == 2 and pool._thread is thread

    third = next(vm for vm in fake.vms if vm.made_as == "pooled" and vm is not second)
    pool.close()
    assert not thread.is_alive()
    assert third.stops == [False]  # the one not handed out is stopped, at once
    assert first.stops == [] and second.stops == []  # handed out: their takers' to stop


def test_pool_keeps_one_slot_per_configuration(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake, size=1)
    pool.take(VMConfig(), name="a")
    eventually(lambda: _ready(pool) == 1)
    big = cast(FakeVM, pool.take(VMConfig(memory_mib=512), name="b"))
    assert big.made_as == "b" and big.config is not None and big.config.memory_mib == 512  # not the 256 MiB one
    eventually(lambda: _ready(pool) == 2)
    assert sorted(c["config"].memory_mib for c in fake.calls if c["name"] == "pooled") == [256, 512]


def test_pool_replaces_a_pooled_vm_that_died(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    pool.take(VMConfig(), name="first")
    eventually(lambda: _ready(pool) == 1)
    dead = next(vm for vm in fake.vms if vm.made_as == "pooled")
    dead.runstate = Runstate.STOPPED
    vm = cast(FakeVM, pool.take(VMConfig(), name="second"))
    assert vm is not dead and vm.made_as == "second"
    assert dead.stops == [False] and dead.name == "pooled"


def test_pool_failure_in_the_background_stops_trying_until_the_next_take(
    pools: Callable[..., ClonePool], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_microvm.machine.snapshot")
    fake = FakeTemplates(fail_pooled=True)
    pool = pools(fake)
    vm = cast(FakeVM, pool.take(VMConfig(), name="first"))
    assert vm.made_as == "first"
    eventually(lambda: fake.names().count("pooled") == 1 and not pool._slots[0].active)
    time.sleep(0.3)  # a busy retry loop would make hundreds of calls here
    assert fake.names().count("pooled") == 1
    assert pool._thread is not None and pool._thread.is_alive()
    warned = _warnings(caplog, "making a clone ahead failed: no template")
    assert len(warned) == 1 and "more" not in warned[0]

    # The next take makes its own VM and asks the thread to try again, once.
    again = cast(FakeVM, pool.take(VMConfig(), name="second"))
    assert again.made_as == "second"
    eventually(lambda: fake.names().count("pooled") == 2)
    time.sleep(0.1)
    assert fake.names().count("pooled") == 2


def test_pool_stops_a_clone_that_was_being_made_when_it_closed(pools: Callable[..., ClonePool]) -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowTemplates(FakeTemplates):
        def start(self, config: VMConfig, **kwargs: Any) -> FakeVM:
            if kwargs.get("name") == "pooled":
                entered.set()
                assert release.wait(5)
            return super().start(config, **kwargs)

    fake = SlowTemplates()
    pool = pools(fake)
    pool.take(VMConfig(), name="first")
    assert entered.wait(5)
    closer = threading.Thread(target=pool.close)
    closer.start()
    eventually(lambda: pool._closed)
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert pool._thread is not None and not pool._thread.is_alive()
    (late,) = [vm for vm in fake.vms if vm.made_as == "pooled"]
    assert late.stops == [False]  # not kept in a pool nobody will take from


def test_pool_of_size_zero_never_starts_a_thread(pools: Callable[..., ClonePool]) -> None:
    threads = _pool_threads()
    fake = FakeTemplates()
    pool = pools(fake, size=0)
    for name in ("a", "b"):
        vm = cast(FakeVM, pool.take(VMConfig(), name=name))
        assert vm.made_as == name
    assert fake.names() == ["a", "b"]
    assert pool._thread is None and _pool_threads() == threads
    pool.close()


def test_pool_does_not_make_ahead_what_cannot_be_a_clone(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    pool.take(VMConfig(), name="hooked", qemu_args_hook=cast(Any, lambda config, argv: argv))
    pool.take(VMConfig(snapshot=False), name="plain")
    assert fake.calls[0]["hooked"] is True and fake.names() == ["hooked", "plain"]
    assert pool._thread is None and not pool._slots
