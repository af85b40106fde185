"""Snapshot templates and clones (machine/snapshot.py) without a VM: the template key and
the host fingerprint in it, when a VM may be a clone, a template on disk (loading and
its checks, its id, discarding only its own making), making one (with a fake TemplateVM
that writes the files), a clone's RAM file (a memfd or an O_TMPFILE in
``$MICROVM_SHM_DIR``) and the sparse copy into it, CloneVM.start's error conversion,
and the choice between clone and boot (with fakes for the template maker, CloneVM and
MicroVM). The pool that makes clones ahead is tests/unit/test_pool.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, cast

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.errors import BootError, ConfigError, GuestError, MicroVMError, ProtocolError
from pytest_microvm.image import GuestImage
from pytest_microvm.machine import snapshot
from pytest_microvm.machine.config import Share
from pytest_microvm.machine.host import HostReport
from pytest_microvm.machine.snapshot import (
    SHM_ENV,
    CannotClone,
    CloneVM,
    ShmTooSmall,
    SnapshotError,
    Template,
    TemplateBroken,
    Templates,
    _copy_extents,
    make_template,
    ram_file,
    template_key,
    why_not,
)
from pytest_microvm.machine.vm import MicroVM
from tests.snapshot_fakes import guest_image, host_report

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _no_shm_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clones' RAM is a memfd unless a test sets $MICROVM_SHM_DIR itself."""
    monkeypatch.delenv(SHM_ENV, raising=False)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


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


def test_template_key_counts_shares_and_ignores_where_they_come_from(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    base = VMConfig()
    key = template_key(base.with_(shares={"/src": one}), image, host)
    # Host path, mode and guest path live in QEMU's fsdev and the mount after the restore.
    assert template_key(base.with_(shares={"/src": two}), image, host) == key
    assert template_key(base.with_(shares={"/src": Share(one, readonly=True)}), image, host) == key
    assert template_key(base.with_(shares={"/elsewhere": two}), image, host) == key
    # How many is in the template (its devices): none, one and two are three templates.
    keys = {
        template_key(base, image, host),
        key,
        template_key(base.with_(shares={"/src": one, "/data": two}), image, host),
    }
    assert len(keys) == 3


def test_template_key_under_kvm_depends_on_the_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = guest_image(tmp_path)

    def keys(host: HostReport, config: VMConfig) -> set[str]:
        found = set()
        for cpu in ("cpu-a", "cpu-b"):
            monkeypatch.setattr(snapshot, "_host_cpu", lambda cpu=cpu: cpu)
            found.add(template_key(config, image, host))
        return found

    assert len(keys(host_report(kvm=True), VMConfig())) == 2  # -cpu host: another CPU, another template
    assert len(keys(host_report(), VMConfig())) == 1  # TCG: QEMU's own CPU model
    assert len(keys(host_report(kvm=True), VMConfig(accel="tcg"))) == 1  # TCG on a KVM host too


class _CpuinfoPath:
    """Stands in for snapshot.Path in _host_cpu: /proc/cpuinfo reads as ``text``."""

    text: str | None = None

    def __init__(self, path: str) -> None:
        assert path == "/proc/cpuinfo"

    def read_text(self) -> str:
        if self.text is None:
            raise PermissionError(errno.EACCES, "no /proc")
        return self.text


def _cpuinfo(*, mhz: str = "2400.000", flags: str = "fpu sse2 avx", second: str = "fpu sse2 avx") -> str:
    """Two processors' entries; ``second``: the flags of the second one."""
    entry = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n"
    return entry.format(n=0, mhz=mhz, flags=flags) + "\n" + entry.format(n=1, mhz=mhz, flags=second)


def test_host_cpu_is_the_cpu_model_flags_and_kernel_but_not_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    real = snapshot._host_cpu()
    assert real == snapshot._host_cpu() and len(real) == 16 and int(real, 16) >= 0

    def fingerprint(text: str | None, release: str = "6.1.0-1-amd64") -> str:
        monkeypatch.setattr(_CpuinfoPath, "text", text)
        monkeypatch.setattr(snapshot, "Path", _CpuinfoPath)
        monkeypatch.setattr(os, "uname", lambda: SimpleNamespace(release=release))  # snapshot.os
        return snapshot._host_cpu()

    base = fingerprint(_cpuinfo())
    assert fingerprint(_cpuinfo(mhz="800.123")) == base  # the frequency changes by the second
    assert fingerprint(_cpuinfo(second="fpu")) == base  # only the first processor's entry
    assert fingerprint(_cpuinfo(flags="fpu sse2")) != base  # a CPU without AVX
    assert fingerprint(_cpuinfo(), release="6.12.0-1-amd64") != base  # KVM's view: the host kernel
    unreadable = fingerprint(None)  # no /proc/cpuinfo: the kernel alone, no error
    assert len(unreadable) == 16 and unreadable != base


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
        (VMConfig(rootfs="host"), host_report(), False, "9p"),
        (VMConfig(), host_report(qemu=None), False, "QEMU is not installed"),
        (VMConfig(vsock="kernel"), host_report(kvm=True, vhost_vsock=True), False, "kernel vhost-vsock"),
        (VMConfig(accel="kvm"), host_report(kvm=True, vhost_vsock=True), False, "kernel vhost-vsock"),  # auto picks it
    ],
)
def test_why_not_names_the_cause(config: VMConfig, host: HostReport, hooked: bool, cause: str) -> None:
    reason = why_not(config, host, hooked=hooked)
    assert reason is not None and cause in reason


def test_why_not_refuses_the_host_root_because_9p_does_not_migrate() -> None:
    reason = why_not(VMConfig(rootfs="host"), host_report())
    assert reason is not None and "9p" in reason and "migrate" in reason
    # Any other root is fine: only the host's / is a share mounted from the first moment.
    assert why_not(VMConfig(rootfs="debian"), host_report()) is None


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


def _copy_file(src_path: Path, dst_path: Path, size: int) -> None:
    """_copy_extents from one path to a new one."""
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _copy_extents(src, dst, size)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_extents_copies_the_data_and_keeps_the_holes(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    content = _sparse_file(
        src_path, size, {0: os.urandom(4096), 3 * MIB: os.urandom(64 * 1024), size - 4096: os.urandom(4096)}
    )
    assert _allocated(src_path) < MIB, "tmp_path's file system does not keep holes"
    _copy_file(src_path, dst_path, size)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == content
    assert _allocated(dst_path) < MIB  # 72 KiB of data: the 8 MiB are not all written


def test_copy_extents_of_a_file_without_data_is_all_zeros(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    _sparse_file(src_path, size, {})
    _copy_file(src_path, dst_path, size)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == bytes(size)
    assert _allocated(dst_path) < MIB


# ---- a template on disk ----------------------------------------------------------------------


def _write_template(
    directory: Path,
    *,
    key: str = "somekey",
    template_id: str = "id-one",
    memory_mib: int = 8,
    chunks: dict[int, bytes] | None = None,
    state: bytes = b"device state",
) -> bytes:
    """The files of a sound template in ``directory``; returns its RAM's content."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "id": template_id, "token": "tok", "memory_mib": memory_mib, "made": 1.0}
    (directory / "template.json").write_text(json.dumps(meta))
    content = _sparse_file(directory / "ram", memory_mib * MIB, chunks or {})
    (directory / "state").write_bytes(state)
    return content


def test_template_load_reads_a_sound_template(tmp_path: Path) -> None:
    directory = tmp_path / "somekey"
    _write_template(directory)
    template = Template.load(directory)
    assert template == Template(directory, "somekey", "id-one", "tok", 8)
    assert template.ram == directory / "ram" and template.state == directory / "state"
    assert template.current_id() == "id-one"


def _rewrite_meta(directory: Path, **changes: Any) -> None:
    path = directory / "template.json"
    meta = json.loads(path.read_text())
    for name, value in changes.items():
        if value is None:
            del meta[name]
        else:
            meta[name] = value
    path.write_text(json.dumps(meta))


DAMAGE: dict[str, Any] = {
    "no template.json": lambda d: (d / "template.json").unlink(),
    "template.json a directory": lambda d: ((d / "template.json").unlink(), (d / "template.json").mkdir()),
    "template.json not JSON": lambda d: (d / "template.json").write_text('{"key": "somekey", "id"'),
    "template.json a list": lambda d: (d / "template.json").write_text('["somekey"]'),
    "no key": lambda d: _rewrite_meta(d, key=None),
    "no id": lambda d: _rewrite_meta(d, id=None),
    "no token": lambda d: _rewrite_meta(d, token=None),
    "no memory_mib": lambda d: _rewrite_meta(d, memory_mib=None),
    "memory_mib not a number": lambda d: _rewrite_meta(d, memory_mib="lots"),
    "memory_mib a list": lambda d: _rewrite_meta(d, memory_mib=[8]),
    "memory_mib other than the RAM": lambda d: _rewrite_meta(d, memory_mib=16),
    "no RAM": lambda d: (d / "ram").unlink(),
    "RAM short": lambda d: os.truncate(d / "ram", 8 * MIB - 4096),
    "RAM long": lambda d: os.truncate(d / "ram", 8 * MIB + 1),
    "RAM empty": lambda d: os.truncate(d / "ram", 0),
    "no state": lambda d: (d / "state").unlink(),
    "state empty": lambda d: (d / "state").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_template_load_refuses_a_damaged_template(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "somekey"
    _write_template(directory)
    DAMAGE[damage](directory)
    with pytest.raises(TemplateBroken, match="snapshot template somekey is") as info:
        Template.load(directory)
    assert isinstance(info.value, SnapshotError)


def test_template_load_of_a_missing_directory_is_broken(tmp_path: Path) -> None:
    with pytest.raises(TemplateBroken, match="incomplete"):
        Template.load(tmp_path / "nothing")


def test_current_id_is_the_id_now_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "somekey"
    _write_template(directory, template_id="first")
    template = Template.load(directory)
    assert template.current_id() == "first"
    _rewrite_meta(directory, id="second")  # remade by another process
    assert template.current_id() == "second" and template.id == "first"
    (directory / "template.json").write_text("not json")
    assert template.current_id() is None
    shutil.rmtree(directory)
    assert template.current_id() is None


def test_discard_removes_its_own_template(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    _write_template(directory)
    Template.load(directory).discard()
    assert not directory.exists()


def test_discard_of_an_old_template_keeps_the_one_made_since(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    _write_template(directory, template_id="old")
    old = Template.load(directory)
    shutil.rmtree(directory)
    _write_template(directory, template_id="new")  # another process found it broken and remade it
    old.discard()
    assert Template.load(directory).id == "new"  # still there, whole
    Template.load(directory).discard()
    assert not directory.exists()


def test_discard_removes_a_template_whose_id_cannot_be_read(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    _write_template(directory, template_id="mine")
    template = Template.load(directory)
    (directory / "template.json").write_text("[1, 2")  # half written: nobody's
    template.discard()
    assert not directory.exists()
    template.discard()  # already gone: nothing to do, no error
    assert not directory.exists()


def test_discard_removes_a_template_without_an_id(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    _write_template(directory, template_id="mine")
    template = Template.load(directory)
    _rewrite_meta(directory, id=None)
    template.discard()
    assert not directory.exists()


# ---- making a template -------------------------------------------------------------------------


class FakeTemplateVM:
    """snapshot.TemplateVM without QEMU: start() writes the RAM file (sparse), save() the
    device state, as the real one leaves them in the staging directory."""

    made: ClassVar[list[FakeTemplateVM]]
    save_error: BaseException | None = None
    ram_mib_off = 0  # a RAM file this many MiB off the configured memory

    def __init__(self, config: VMConfig, ram: Path, **kwargs: Any) -> None:
        self.config = config
        self.ram = ram
        self.kwargs = kwargs
        self.token = secrets.token_hex(16)
        self.events: list[str] = []
        self.made.append(self)

    def start(self) -> FakeTemplateVM:
        self.events.append("start")
        with open(self.ram, "wb") as f:
            f.truncate((self.config.memory_mib + self.ram_mib_off) * MIB)
        return self

    def save(self, state: Path, timeout: float = 20.0) -> None:
        self.events.append("save")
        if self.save_error is not None:
            raise self.save_error
        assert state.parent == self.ram.parent
        state.write_bytes(b"device state " * 100)

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        self.events.append(f"stop graceful={graceful}")


@pytest.fixture
def template_vms(monkeypatch: pytest.MonkeyPatch) -> type[FakeTemplateVM]:
    """snapshot.TemplateVM replaced by a fresh subclass of FakeTemplateVM (its own list)."""

    class Fake(FakeTemplateVM):
        made: ClassVar[list[FakeTemplateVM]] = []

    monkeypatch.setattr(snapshot, "TemplateVM", Fake)
    return Fake


def _make(tmp_path: Path, key: str = "somekey", memory_mib: int = 64) -> Template:
    return make_template(VMConfig(memory_mib=memory_mib), guest_image(tmp_path), host_report(), key, tmp_path)


def _entries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in snapshot.templates_dir(tmp_path).iterdir())


def test_make_template_boots_saves_and_names_it(tmp_path: Path, template_vms: type[FakeTemplateVM]) -> None:
    template = _make(tmp_path)
    final = snapshot.templates_dir(tmp_path) / "somekey"
    (vm,) = template_vms.made
    assert vm.events == ["start", "save", "stop graceful=False"]
    assert vm.config.image is not None and vm.config.image.key == "imagekey0123"  # the image it was keyed on
    assert vm.kwargs["name"] == "template" and vm.kwargs["host"] == host_report()
    meta = json.loads((final / "template.json").read_text())
    assert meta["key"] == "somekey" and meta["token"] == vm.token and meta["memory_mib"] == 64
    assert isinstance(meta["id"], str) and len(meta["id"]) == 16 and int(meta["id"], 16) >= 0
    assert template == Template(final, "somekey", meta["id"], vm.token, 64)
    assert template == Template.load(final)
    assert _allocated(final / "ram") < MIB  # the RAM stays sparse
    assert _entries(tmp_path) == ["somekey", "somekey.lock"]  # no staging directory left


def test_make_template_uses_a_sound_one_without_booting(tmp_path: Path, template_vms: type[FakeTemplateVM]) -> None:
    first = _make(tmp_path)
    again = _make(tmp_path)
    assert again == first and len(template_vms.made) == 1
    # One written by another process (or an earlier run) is as good.
    directory = snapshot.templates_dir(tmp_path) / "other"
    _write_template(directory, key="other", template_id="theirs", memory_mib=64)
    assert _make(tmp_path, "other") == Template(directory, "other", "theirs", "tok", 64)
    assert len(template_vms.made) == 1


@pytest.mark.parametrize(
    "damage", ["RAM short", "no state", "state empty", "no template.json", "template.json not JSON"]
)
def test_make_template_remakes_a_damaged_one_with_a_new_id(
    tmp_path: Path, template_vms: type[FakeTemplateVM], damage: str
) -> None:
    first = _make(tmp_path)
    DAMAGE[damage](first.directory)
    remade = _make(tmp_path)
    assert len(template_vms.made) == 2
    assert remade.directory == first.directory and remade.id != first.id
    assert remade.token == template_vms.made[1].token
    assert Template.load(first.directory) == remade
    assert first.current_id() == remade.id  # the old object sees it was remade
    assert _entries(tmp_path) == ["somekey", "somekey.lock"]


def test_make_template_that_fails_leaves_nothing_and_stops_the_vm(
    tmp_path: Path, template_vms: type[FakeTemplateVM]
) -> None:
    template_vms.save_error = SnapshotError("the guest did not release its vsock device")
    with pytest.raises(SnapshotError, match="did not release"):
        _make(tmp_path)
    (vm,) = template_vms.made
    assert vm.events == ["start", "save", "stop graceful=False"]
    assert _entries(tmp_path) == ["somekey.lock"]
    # The next call tries again (and, the fault gone, makes it).
    template_vms.save_error = None
    assert _make(tmp_path).current_id() is not None and len(template_vms.made) == 2


def test_making_a_template_removes_those_unused_for_two_weeks(
    tmp_path: Path, template_vms: type[FakeTemplateVM]
) -> None:
    old = make_template(VMConfig(), guest_image(tmp_path), host_report(), "oldkey", tmp_path)
    recent = make_template(VMConfig(), guest_image(tmp_path), host_report(), "recentkey", tmp_path)
    weeks_ago = time.time() - 15 * 86400
    os.utime(old.directory / "template.json", (weeks_ago, weeks_ago))
    make_template(VMConfig(), guest_image(tmp_path), host_report(), "newkey", tmp_path)
    assert not old.directory.exists()  # unused for 15 days: gone
    assert recent.directory.exists() and (snapshot.templates_dir(tmp_path) / "newkey").exists()
    # Finding a template in the cache sweeps nothing: only making one does.
    os.utime(recent.directory / "template.json", (weeks_ago, weeks_ago))
    make_template(VMConfig(), guest_image(tmp_path), host_report(), "newkey", tmp_path)
    assert recent.directory.exists()


def test_a_use_is_recorded_at_most_once_a_day(tmp_path: Path, template_vms: type[FakeTemplateVM]) -> None:
    template = make_template(VMConfig(), guest_image(tmp_path), host_report(), "k", tmp_path)
    meta = template.directory / "template.json"
    hour_ago, days_ago = time.time() - 3600, time.time() - 3 * 86400
    os.utime(meta, (hour_ago, hour_ago))
    template.touch()
    assert meta.stat().st_mtime == pytest.approx(hour_ago)  # used today already: no write
    os.utime(meta, (days_ago, days_ago))
    template.touch()
    assert meta.stat().st_mtime > time.time() - 60
    assert snapshot.forget_unused(template.directory.parent, days=1) == []


def test_make_template_refuses_what_it_made_wrong(tmp_path: Path, template_vms: type[FakeTemplateVM]) -> None:
    template_vms.ram_mib_off = -1  # a RAM file that does not match the memory size
    with pytest.raises(TemplateBroken, match="damaged"):
        _make(tmp_path)
    assert _entries(tmp_path) == ["somekey.lock"]  # never under its name


# ---- a clone's RAM file ----------------------------------------------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory that takes O_TMPFILE (one in tmp_path, else one in /dev/shm)."""
    where = tmp_path / "shm"
    where.mkdir()
    made = None
    try:
        os.close(os.open(where, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        where = made = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="microvm-test-"))
    try:
        yield where
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _template(tmp_path: Path, memory_mib: int, chunks: dict[int, bytes]) -> tuple[Template, bytes]:
    directory = tmp_path / "template"
    content = _write_template(directory, key="key", template_id="id0", memory_mib=memory_mib, chunks=chunks)
    return Template.load(directory), content


def _check_ram_pair(dst: int, src: int, template: Template, content: bytes) -> None:
    """dst: sized like the template's RAM, nothing written; src: that RAM, read-only;
    both closed on exec; _copy_extents then fills dst with the template's content."""
    assert os.readlink(f"/proc/self/fd/{src}") == str(template.ram)
    assert (os.get_inheritable(src), os.get_inheritable(dst)) == (False, False)
    with pytest.raises(OSError):
        os.write(src, b"x")  # opened read-only
    assert os.fstat(dst).st_size == len(content) == template.memory_mib * MIB
    assert os.fstat(dst).st_blocks == 0  # sized, not filled
    _copy_extents(src, dst, os.fstat(src).st_size)
    assert os.pread(dst, len(content) + 1, 0) == content


def test_ram_file_is_a_memfd_by_default(tmp_path: Path) -> None:
    template, content = _template(tmp_path, 8, {0: os.urandom(4096), 5 * MIB: os.urandom(8192)})
    fds = _open_fds()
    dst, src = ram_file(template)
    try:
        assert os.readlink(f"/proc/self/fd/{dst}").startswith("/memfd:")
        _check_ram_pair(dst, src, template, content)
    finally:
        os.close(dst)
        os.close(src)
    assert _open_fds() == fds


def test_ram_file_in_the_shm_dir_is_an_unnamed_file(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHM_ENV, str(shm_dir))
    template, content = _template(tmp_path, 8, {MIB: os.urandom(4096), 8 * MIB - 100: os.urandom(100)})
    before = set(os.listdir(shm_dir))
    dst, src = ram_file(template)
    try:
        # O_TMPFILE: Linux shows "<dir>/#<inode> (deleted)"; the file has no link anywhere.
        link = os.readlink(f"/proc/self/fd/{dst}")
        assert link.startswith(f"{shm_dir}/#") and link.endswith(" (deleted)"), link
        assert os.fstat(dst).st_nlink == 0
        assert set(os.listdir(shm_dir)) == before
        _check_ram_pair(dst, src, template, content)
    finally:
        os.close(dst)
        os.close(src)
    assert set(os.listdir(shm_dir)) == before


def _fake_free(monkeypatch: pytest.MonkeyPatch, mib: int) -> None:
    monkeypatch.setattr(
        "pytest_microvm.machine.snapshot.os.statvfs", lambda path: SimpleNamespace(f_bavail=mib * 256, f_frsize=4096)
    )


def test_ram_file_refuses_a_tmpfs_too_small_for_the_guest(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHM_ENV, str(shm_dir))
    template = Template(tmp_path, "key", "id0", "token", 256)  # no RAM file: refused before it is read
    _fake_free(monkeypatch, 10)
    fds = _open_fds()
    with pytest.raises(ShmTooSmall) as info:
        ram_file(template)
    assert isinstance(info.value, CannotClone) and isinstance(info.value, SnapshotError)
    message = str(info.value)
    assert "has 10 MiB free" in message and "needs 256 MiB" in message
    assert str(shm_dir) in message and "MICROVM_SHM_DIR" in message
    assert _open_fds() == fds


def test_ram_file_takes_a_tmpfs_with_just_enough_room(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHM_ENV, str(shm_dir))
    template, _ = _template(tmp_path, 8, {})
    _fake_free(monkeypatch, 8)
    dst, src = ram_file(template)
    os.close(dst)
    os.close(src)


def test_ram_file_in_a_missing_shm_dir_cannot_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template, _ = _template(tmp_path, 8, {})
    monkeypatch.setenv(SHM_ENV, str(tmp_path / "nowhere"))
    fds = _open_fds()
    with pytest.raises(CannotClone, match="nowhere") as info:
        ram_file(template)
    assert SHM_ENV in str(info.value)
    assert _open_fds() == fds


def test_ram_file_where_no_unnamed_file_can_be_made_cannot_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, _ = _template(tmp_path, 8, {})
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"")  # statvfs works on it; O_TMPFILE needs a directory
    monkeypatch.setenv(SHM_ENV, str(not_a_dir))
    fds = _open_fds()
    with pytest.raises(CannotClone, match="O_TMPFILE") as info:
        ram_file(template)
    assert not isinstance(info.value, ShmTooSmall) and SHM_ENV in str(info.value)
    assert _open_fds() == fds


@pytest.fixture(params=["memfd", "shm"])
def ram_mode(request: pytest.FixtureRequest, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each RAM file flavour in turn."""
    mode = cast(str, request.param)
    if mode == "shm":
        monkeypatch.setenv(SHM_ENV, str(shm_dir))
    return mode


def _loop(ram: Path) -> None:
    ram.unlink()
    ram.symlink_to(ram.name)  # a link to itself: ELOOP, an OSError that is not FileNotFoundError


@pytest.mark.parametrize("damage", ["missing", "unopenable"])
def test_ram_file_of_an_unreadable_template_ram_is_a_snapshot_error_and_leaks_nothing(
    tmp_path: Path, ram_mode: str, damage: str
) -> None:
    template, _ = _template(tmp_path, 8, {})
    if damage == "missing":
        template.ram.unlink()
    else:
        _loop(template.ram)
    fds = _open_fds()
    with pytest.raises(SnapshotError, match="cannot read snapshot template key's RAM") as info:
        ram_file(template)
    assert not isinstance(info.value, CannotClone)  # the template's fault, not the host's
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value.__cause__, FileNotFoundError) == (damage == "missing")
    assert _open_fds() == fds  # the clone's file was closed


def test_ram_file_that_cannot_be_sized_leaks_nothing(
    tmp_path: Path, ram_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, _ = _template(tmp_path, 8, {})

    def refuse(fd: int, length: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr("pytest_microvm.machine.snapshot.os.ftruncate", refuse)
    fds = _open_fds()
    with pytest.raises((OSError, SnapshotError)):
        ram_file(template)
    assert _open_fds() == fds  # both descriptors closed


# ---- CloneVM.start: what keeps a clone from coming up is a SnapshotError ------------------------


@pytest.mark.parametrize(
    "error",
    [
        BootError("the probe failed: agent gone\nmore", console_tail="console tail", qemu_stderr="qemu said"),
        GuestError("QEMU exited with status 1", qemu_stderr="qemu said"),
        ProtocolError("HELLO with a bad token"),
    ],
)
def test_clone_start_turns_guest_and_protocol_errors_into_snapshot_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: MicroVMError
) -> None:
    def fail(self: MicroVM) -> MicroVM:
        raise error

    monkeypatch.setattr(MicroVM, "start", fail)
    clone = CloneVM(VMConfig(), Template(tmp_path, "key", "id0", "token", 8))
    with pytest.raises(SnapshotError) as info:
        clone.start()
    assert type(info.value) is SnapshotError and info.value.__cause__ is error
    first = str(error).splitlines()[0]
    assert str(info.value).startswith(f"the clone did not come up: {first}")
    expected = error if isinstance(error, GuestError) else None
    assert info.value.console_tail == (expected.console_tail if expected else "")
    assert info.value.qemu_stderr == (expected.qemu_stderr if expected else "")


@pytest.mark.parametrize(
    "error", [TemplateBroken("the state did not load"), CannotClone("no O_TMPFILE"), ConfigError("no QEMU")]
)
def test_clone_start_passes_snapshot_and_config_errors_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: MicroVMError
) -> None:
    def fail(self: MicroVM) -> MicroVM:
        raise error

    monkeypatch.setattr(MicroVM, "start", fail)
    with pytest.raises(type(error)) as info:
        CloneVM(VMConfig(), Template(tmp_path, "key", "id0", "token", 8)).start()
    assert info.value is error


# ---- Templates.start: a clone when possible, else a boot -----------------------------------------


class FakeTemplate:
    def __init__(self, key: str, number: int) -> None:
        self.key = key
        self.id = f"id{number}"
        self.token = "tok"
        self.memory_mib = 256
        self.discarded = 0

    def discard(self) -> None:
        self.discarded += 1

    def touch(self) -> None:
        self.touched = getattr(self, "touched", 0) + 1


class FakeVM:
    """What Templates.start uses of a started VM."""

    def __init__(self, name: str, kind: str, config: VMConfig | None = None, **kwargs: Any) -> None:
        self.name = name
        self.kind = kind
        self.config = config
        self.kwargs = kwargs


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
            fakes.templates.append(FakeTemplate(key, len(fakes.templates)))
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
    assert vm.kwargs["template"] is fakes.templates[1] and fakes.templates[1].id == "id1"
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


@pytest.mark.parametrize(
    "config", [VMConfig(snapshot=False), VMConfig(rootfs="host")], ids=["no-snapshot", "host-root"]
)
def test_a_config_that_cannot_be_a_clone_boots_without_a_template(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture, config: VMConfig
) -> None:
    caplog.set_level(logging.DEBUG, logger="pytest_microvm.machine.snapshot")
    hook = cast(Any, lambda config, argv: argv)
    vm = _start(Templates(tmp_path), config, name="b", qemu_args_hook=hook)
    assert vm.kind == "boot" and vm.name == "b" and vm.kwargs["qemu_args_hook"] is hook
    assert not fakes.templates and not fakes.clones
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the user asked for it: no warning
