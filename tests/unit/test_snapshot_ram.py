"""machine/snapshot/ram.py: a clone's RAM. The sparse copy of a template's RAM
(``copy_extents``: data copied, holes kept), the nameless file a copy goes into
(``ram_file``: a memfd, or an O_TMPFILE in ``$MICROVM_SHM_DIR`` checked for room), and
the two kinds ``clone_ram`` chooses between: ``CopiedRam`` (filled by a thread, shared)
and ``MappedRam`` (the template's own file, read-only here, mapped copy-on-write by
QEMU). Every failure is a SnapshotError (CannotClone when it is the host's) and leaks no
descriptor.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from pytest_microvm.machine.snapshot import ram
from pytest_microvm.machine.snapshot.errors import CannotClone, ShmTooSmall, SnapshotError
from pytest_microvm.machine.snapshot.ram import (
    SHM_ENV,
    CopiedRam,
    MappedRam,
    clone_ram,
    copy_extents,
    punch_zero_pages,
    ram_file,
)
from pytest_microvm.machine.snapshot.store import Template
from tests.snapshot_fakes import MIB, allocated, open_fds, sparse_file, write_template


@pytest.fixture(autouse=True)
def _no_shm_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clones' RAM is a memfd unless a test sets $MICROVM_SHM_DIR itself."""
    monkeypatch.delenv(SHM_ENV, raising=False)


# ---- the sparse RAM copy ---------------------------------------------------------------------


def _copy_file(src_path: Path, dst_path: Path, size: int) -> None:
    """copy_extents from one path to a new one."""
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_extents(src, dst, size)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_extents_copies_the_data_and_keeps_the_holes(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    content = sparse_file(
        src_path, size, {0: os.urandom(4096), 3 * MIB: os.urandom(64 * 1024), size - 4096: os.urandom(4096)}
    )
    assert allocated(src_path) < MIB, "tmp_path's file system does not keep holes"
    _copy_file(src_path, dst_path, size)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == content
    assert allocated(dst_path) < MIB  # 72 KiB of data: the 8 MiB are not all written


def test_punch_zero_pages_makes_holes_of_zeros_and_keeps_every_byte(tmp_path: Path) -> None:
    size = 8 * MIB
    path = tmp_path / "ram"
    page = 4096
    # Written everywhere (as a guest touches RAM), zeros in most of it: whole 2 MiB blocks,
    # runs of pages between data, single pages, and data in the last page.
    content = bytearray(size)
    for offset, data in {0: os.urandom(10), 3 * page: os.urandom(page), 2 * MIB + 5 * page: b"x",
                         5 * MIB - 1: b"y", size - 1: b"z"}.items():  # fmt: skip
        content[offset : offset + len(data)] = data
    path.write_bytes(content)
    assert allocated(path) >= size, "the file should start fully allocated"
    punched = punch_zero_pages(path)
    assert path.read_bytes() == content
    data_pages = 5  # 0, 3, 2 MiB + 5, the page holding 5 MiB - 1, the last page
    assert punched == size - data_pages * page
    assert allocated(path) <= data_pages * page
    assert punch_zero_pages(path) == 0  # nothing left to punch
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert punch_zero_pages(empty) == 0


def test_copy_extents_of_a_file_without_data_is_all_zeros(tmp_path: Path) -> None:
    size = 8 * MIB
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    sparse_file(src_path, size, {})
    _copy_file(src_path, dst_path, size)
    assert dst_path.stat().st_size == size
    assert dst_path.read_bytes() == bytes(size)
    assert allocated(dst_path) < MIB


def test_copy_extents_of_a_file_that_shrank_under_it_is_a_snapshot_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    sparse_file(src_path, MIB, {0: os.urandom(4096)})
    # Truncated between finding the extent and copying it: sendfile has nothing to give.
    monkeypatch.setattr("pytest_microvm.machine.snapshot.ram.os.sendfile", lambda out_fd, in_fd, offset, count: 0)
    with pytest.raises(SnapshotError, match="shorter than it says"):
        _copy_file(src_path, dst_path, MIB)


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
    content = write_template(directory, key="key", template_id="id0", memory_mib=memory_mib, chunks=chunks)
    return Template.load(directory), content


def _check_ram_pair(dst: int, src: int, template: Template, content: bytes) -> None:
    """dst: sized like the template's RAM, nothing written; src: that RAM, read-only;
    both closed on exec; copy_extents then fills dst with the template's content."""
    assert os.readlink(f"/proc/self/fd/{src}") == str(template.ram)
    assert (os.get_inheritable(src), os.get_inheritable(dst)) == (False, False)
    with pytest.raises(OSError):
        os.write(src, b"x")  # opened read-only
    assert os.fstat(dst).st_size == len(content) == template.memory_mib * MIB
    assert os.fstat(dst).st_blocks == 0  # sized, not filled
    copy_extents(src, dst, os.fstat(src).st_size)
    assert os.pread(dst, len(content) + 1, 0) == content


def test_ram_file_is_a_memfd_by_default(tmp_path: Path) -> None:
    template, content = _template(tmp_path, 8, {0: os.urandom(4096), 5 * MIB: os.urandom(8192)})
    fds = open_fds()
    dst, src = ram_file(template)
    try:
        assert os.readlink(f"/proc/self/fd/{dst}").startswith("/memfd:")
        _check_ram_pair(dst, src, template, content)
    finally:
        os.close(dst)
        os.close(src)
    assert open_fds() == fds


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
        "pytest_microvm.machine.snapshot.ram.os.statvfs",
        lambda path: SimpleNamespace(f_bavail=mib * 256, f_frsize=4096),
    )


def test_ram_file_refuses_a_tmpfs_too_small_for_the_guest(
    tmp_path: Path, shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHM_ENV, str(shm_dir))
    template = Template(tmp_path, "key", "id0", "token", 256)  # no RAM file: refused before it is read
    _fake_free(monkeypatch, 10)
    fds = open_fds()
    with pytest.raises(ShmTooSmall) as info:
        ram_file(template)
    assert isinstance(info.value, CannotClone) and isinstance(info.value, SnapshotError)
    message = str(info.value)
    assert "has 10 MiB free" in message and "needs 256 MiB" in message
    assert str(shm_dir) in message and "MICROVM_SHM_DIR" in message
    assert open_fds() == fds


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
    fds = open_fds()
    with pytest.raises(CannotClone, match="nowhere") as info:
        ram_file(template)
    assert SHM_ENV in str(info.value)
    assert open_fds() == fds


def test_ram_file_where_no_unnamed_file_can_be_made_cannot_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, _ = _template(tmp_path, 8, {})
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"")  # statvfs works on it; O_TMPFILE needs a directory
    monkeypatch.setenv(SHM_ENV, str(not_a_dir))
    fds = open_fds()
    with pytest.raises(CannotClone, match="O_TMPFILE") as info:
        ram_file(template)
    assert not isinstance(info.value, ShmTooSmall) and SHM_ENV in str(info.value)
    assert open_fds() == fds


def test_ram_file_without_a_memfd_is_a_snapshot_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template, _ = _template(tmp_path, 8, {})

    def refuse(name: str, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("pytest_microvm.machine.snapshot.ram.os.memfd_create", refuse)
    fds = open_fds()
    with pytest.raises(SnapshotError, match="cannot make a file for clone RAM") as info:
        ram_file(template)
    assert not isinstance(info.value, CannotClone) and isinstance(info.value.__cause__, OSError)
    assert open_fds() == fds


@pytest.fixture(params=["memfd", "shm"])
def ram_mode(request: pytest.FixtureRequest, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each RAM file flavour in turn."""
    mode = cast(str, request.param)
    if mode == "shm":
        monkeypatch.setenv(SHM_ENV, str(shm_dir))
    return mode


def _loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)  # a link to itself: ELOOP, an OSError that is not FileNotFoundError


@pytest.mark.parametrize("damage", ["missing", "unopenable"])
def test_ram_file_of_an_unreadable_template_ram_is_a_snapshot_error_and_leaks_nothing(
    tmp_path: Path, ram_mode: str, damage: str
) -> None:
    template, _ = _template(tmp_path, 8, {})
    if damage == "missing":
        template.ram.unlink()
    else:
        _loop(template.ram)
    fds = open_fds()
    with pytest.raises(SnapshotError, match="cannot read snapshot template key's RAM") as info:
        ram_file(template)
    assert not isinstance(info.value, CannotClone)  # the template's fault, not the host's
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value.__cause__, FileNotFoundError) == (damage == "missing")
    assert open_fds() == fds  # the clone's file was closed


def test_ram_file_that_cannot_be_sized_leaks_nothing(
    tmp_path: Path, ram_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, _ = _template(tmp_path, 8, {})

    def refuse(fd: int, length: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr("pytest_microvm.machine.snapshot.ram.os.ftruncate", refuse)
    fds = open_fds()
    with pytest.raises(SnapshotError, match="cannot size the file for clone RAM") as info:
        ram_file(template)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EFBIG
    assert open_fds() == fds  # both descriptors closed


# ---- clone_ram: a copy, or the template's file mapped copy-on-write ------------------------------


def test_copied_ram_is_a_nameless_sparse_copy_of_the_template(tmp_path: Path, ram_mode: str) -> None:
    template, content = _template(tmp_path, 8, {0: os.urandom(4096), 6 * MIB: os.urandom(8192)})
    fds = open_fds()
    copy = clone_ram(template, shared=True, name="c1")
    try:
        assert isinstance(copy, CopiedRam) and copy.shared
        (fd,) = copy.pass_fds
        assert copy.path == f"/proc/self/fd/{fd}"
        assert os.fstat(fd).st_nlink == 0  # no name anywhere
        copy.ready()
        assert os.pread(fd, len(content) + 1, 0) == content
        assert os.fstat(fd).st_blocks * 512 < MIB  # the holes stayed holes
        os.pwrite(fd, b"guest writes", 0)  # a clone's writes are its own
        assert template.ram.read_bytes() == content
    finally:
        copy.close()
    assert open_fds() == fds  # the copy and the template's RAM (the filling thread's) closed
    copy.close()  # twice: nothing more to do
    assert open_fds() == fds


def test_copied_ram_closed_before_it_was_ready_waits_for_the_copy(tmp_path: Path) -> None:
    template, _ = _template(tmp_path, 8, {MIB: os.urandom(4096)})
    fds = open_fds()
    copy = CopiedRam(template, "c2")
    copy.close()  # a start that failed before the restore: the copy still ran
    assert open_fds() == fds


def test_copied_ram_whose_copy_failed_is_a_snapshot_error_when_awaited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template, _ = _template(tmp_path, 8, {})

    def fail(src: int, dst: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ram, "copy_extents", fail)
    fds = open_fds()
    copy = clone_ram(template, shared=True)
    with pytest.raises(SnapshotError, match=r"copying the template's RAM failed: .*Input/output error"):
        copy.ready()
    copy.close()
    assert open_fds() == fds


def test_copied_ram_of_an_unreadable_template_is_a_snapshot_error(tmp_path: Path) -> None:
    template, _ = _template(tmp_path, 8, {})
    template.ram.unlink()
    fds = open_fds()
    with pytest.raises(SnapshotError, match="cannot read snapshot template key's RAM"):
        clone_ram(template, shared=True)
    assert open_fds() == fds


def test_mapped_ram_is_the_templates_own_file_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No copy, so no tmpfs: $MICROVM_SHM_DIR does not apply (here it would be refused).
    monkeypatch.setenv(SHM_ENV, str(tmp_path / "nowhere"))
    template, content = _template(tmp_path, 8, {2 * MIB: os.urandom(4096)})
    fds = open_fds()
    mapped = clone_ram(template, shared=False, name="c3")
    try:
        assert isinstance(mapped, MappedRam) and not mapped.shared
        (fd,) = mapped.pass_fds
        assert mapped.path == f"/proc/self/fd/{fd}"
        assert open_fds() == fds | {str(fd)}  # one descriptor, no copy
        assert os.readlink(f"/proc/self/fd/{fd}") == str(template.ram)
        assert not os.get_inheritable(fd)  # QEMU gets it through pass_fds only
        with pytest.raises(OSError):
            os.write(fd, b"x")  # opened read-only: the template's file is never written through it
        mapped.ready()  # nothing to wait for
        assert os.pread(fd, len(content) + 1, 0) == content
    finally:
        mapped.close()
    assert open_fds() == fds
    mapped.close()  # twice: nothing more to do
    assert template.ram.read_bytes() == content


def test_mapped_ram_of_an_unreadable_template_is_a_snapshot_error(tmp_path: Path) -> None:
    template, _ = _template(tmp_path, 8, {})
    _loop(template.ram)
    fds = open_fds()
    with pytest.raises(SnapshotError, match="cannot read snapshot template key's RAM") as info:
        clone_ram(template, shared=False)
    assert not isinstance(info.value, CannotClone) and isinstance(info.value.__cause__, OSError)
    assert open_fds() == fds
