"""The user's rootfs: tar unpacking that never writes outside the root, /bin/sh check, EROFS packing."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_microvm import ImageError
from pytest_microvm.image import rootfs
from pytest_microvm.image.rootfs import check_root, have_mkfs_erofs, make_erofs, resolve_in_root, user_root

Member = tuple[tarfile.TarInfo, bytes | None]
MTIME = 1_600_000_000


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **attrs: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = kind, mode, MTIME
    for key, value in attrs.items():
        setattr(ti, key, value)
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    ti = info(name, mode=mode)
    ti.size = len(data)
    return ti, data


def sym(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hard(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target), None


def folder(name: str, mode: int = 0o755) -> Member:
    return info(name, tarfile.DIRTYPE, mode), None


def shell_root() -> list[Member]:
    """The smallest root check_root accepts: /bin/sh -> /bin/busybox (absolute, as busybox installs it)."""
    return [folder("bin"), reg("bin/busybox", b"#!fake busybox\n", 0o755), sym("bin/sh", "/bin/busybox")]


def write_tar(path: Path, members: list[Member], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def test_good_tar_unpacks_with_links_modes_and_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = [
        *shell_root(),
        hard("bin/ash", "bin/busybox"),
        folder("etc"),
        sym("etc/mtab", "/proc/self/mounts"),  # absolute, and exists on the host: kept as a link, never followed
        sym("etc/os-release", "../usr/lib/os-release"),
        reg("./usr/lib/os-release", b"ID=test\n"),  # parents not in the archive, and a ./ prefix
        reg("usr/bin/passwd", b"x", 0o4755),
        folder("proc", 0o555),
    ]
    tar = write_tar(tmp_path / "root.tar", members)
    cache = tmp_path / "cache"
    root = user_root(tar, cache, lambda m: None)
    tree = root.tree
    assert tree.is_relative_to(cache / "rootfs")
    assert os.readlink(tree / "bin" / "sh") == "/bin/busybox"
    assert os.readlink(tree / "etc" / "mtab") == "/proc/self/mounts"
    assert (tree / "etc" / "os-release").read_bytes() == b"ID=test\n"  # relative link works on the host too
    assert (tree / "bin" / "ash").stat().st_ino == (tree / "bin" / "busybox").stat().st_ino
    assert stat.S_IMODE((tree / "usr" / "bin" / "passwd").stat().st_mode) == 0o4755
    assert stat.S_IMODE((tree / "bin" / "busybox").stat().st_mode) == 0o755
    assert (tree / "bin" / "busybox").stat().st_mtime == MTIME
    assert (tree / "proc").stat().st_mtime == MTIME
    if os.geteuid() == 0:
        assert stat.S_IMODE((tree / "proc").stat().st_mode) == 0o555

    # A second call finds the unpack in the cache and does not read the archive again.
    monkeypatch.setattr(rootfs, "_unpack_tar", lambda *a: pytest.fail("unpacked twice"))
    monkeypatch.setattr(rootfs, "_looks_like_tar", lambda *a: pytest.fail("opened twice"))
    assert user_root(tar, cache, lambda m: None) == root


@pytest.mark.parametrize("compression", ["gz", "xz", "bz2"])
def test_compressed_tars_unpack(tmp_path: Path, compression: str) -> None:
    tar = write_tar(tmp_path / f"root.tar.{compression}", shell_root(), f"w:{compression}")
    assert tar.read_bytes()[:1] != b"b"  # really compressed, not a plain tar that happens to work
    root = user_root(tar, tmp_path / "cache", lambda m: None)
    assert (root.tree / "bin" / "busybox").read_bytes() == b"#!fake busybox\n"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd tool")
def test_zstd_tar_unpacks(tmp_path: Path) -> None:
    plain = write_tar(tmp_path / "root.tar", shell_root())
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "root.tar.zst")], check=True)
    root = user_root(tmp_path / "root.tar.zst", tmp_path / "cache", lambda m: None)
    assert os.readlink(root.tree / "bin" / "sh") == "/bin/busybox"


def refused(tmp_path: Path, members: list[Member], match: str) -> None:
    """Unpacking must fail with ``match`` and leave nothing in the cache but the lock."""
    tmp_path.mkdir(exist_ok=True)
    tar = write_tar(tmp_path / "bad.tar", [*shell_root(), *members])
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match=match):
        user_root(tar, cache, lambda m: None)
    assert [p.name for p in (cache / "rootfs").iterdir() if not p.name.endswith(".lock")] == []


def test_absolute_member_name_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, [reg("/etc/passwd", b"x")], r"'/etc/passwd'.*absolute")


def test_dotdot_member_name_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, [reg("usr/../../escape", b"x")], r"'usr/\.\./\.\./escape'.*'\.\.'")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", "missing/file"])
def test_hard_link_out_of_the_root_is_refused(tmp_path: Path, target: str) -> None:
    (tmp_path / "outside").write_text("secret")
    refused(tmp_path, [hard("bin/leak", target)], r"'bin/leak'")


def test_writing_through_an_earlier_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for n, target in enumerate((str(outside), "../../../outside")):
        refused(tmp_path / str(n), [sym("evil", target), reg("evil/passwd", b"pwned")], r"'evil/passwd'.*symlink /evil")
        refused(tmp_path / str(n), [sym("evil", target), folder("evil/sub")], r"'evil/sub'.*symlink /evil")
    assert list(outside.iterdir()) == []


def test_device_nodes_and_fifos_are_skipped_with_one_warning(tmp_path: Path) -> None:
    members = [
        *shell_root(),
        folder("dev"),
        (info("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3), None),
        (info("dev/sda", tarfile.BLKTYPE, 0o660, devmajor=8, devminor=0), None),
        (info("run/initctl", tarfile.FIFOTYPE, 0o600), None),
    ]
    messages: list[str] = []
    root = user_root(write_tar(tmp_path / "root.tar", members), tmp_path / "cache", messages.append)
    assert sorted(os.listdir(root.tree / "dev")) == []
    assert not (root.tree / "run" / "initctl").exists()
    warnings = [m for m in messages if "skipped" in m]
    assert len(warnings) == 1 and "skipped 3 " in warnings[0] and "devtmpfs" in warnings[0]


def test_tar_without_a_shell_is_refused_and_not_cached(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "root.tar", [folder("etc"), reg("etc/hostname", b"x\n")])
    with pytest.raises(
        ImageError, match=rf"^rootfs {tar} has no /bin/sh: commands run through /bin/sh -c; add a shell"
    ):
        user_root(tar, tmp_path / "cache", lambda m: None)
    assert [p.name for p in (tmp_path / "cache" / "rootfs").iterdir() if not p.name.endswith(".lock")] == []


def test_directory_root_is_used_as_it_is(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "busybox").write_bytes(b"x")
    (tree / "bin" / "busybox").chmod(0o755)
    (tree / "bin" / "sh").symlink_to("/bin/busybox")
    before = sorted((p.relative_to(tree), p.lstat().st_mtime_ns) for p in tree.rglob("*"))
    first = user_root(tree, tmp_path / "cache", lambda m: None)
    assert first.tree == tree.resolve()
    assert sorted((p.relative_to(tree), p.lstat().st_mtime_ns) for p in tree.rglob("*")) == before
    assert not (tmp_path / "cache").exists()  # a directory needs no cache entry
    assert user_root(tree, tmp_path / "cache", lambda m: None).key == first.key
    (tree / "etc").mkdir()
    assert user_root(tree, tmp_path / "cache", lambda m: None).key != first.key  # the key follows the tree


def test_directory_without_a_shell_names_it(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "bin").mkdir(parents=True)
    with pytest.raises(ImageError, match=rf"rootfs {tree} has no /bin/sh: commands run through /bin/sh -c"):
        user_root(tree, tmp_path / "cache", lambda m: None)
    # /usr/bin/env exists on the host, not in the tree: the link is followed inside the tree only.
    (tree / "bin" / "sh").symlink_to("/usr/bin/env")
    with pytest.raises(ImageError, match=r"/bin/sh -> /usr/bin/env, which is not in it"):
        check_root(tree)
    (tree / "bin" / "sh").unlink()
    (tree / "bin" / "sh").write_text("not executable")
    with pytest.raises(ImageError, match="no executable /bin/sh"):
        check_root(tree)


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "bin").symlink_to("usr/bin")
    (tree / "usr" / "bin" / "up").symlink_to("../../../../../../etc")
    (tree / "loop").symlink_to("loop")
    assert resolve_in_root(tree, "/bin/sh") == tree / "usr" / "bin" / "sh"
    assert resolve_in_root(tree, "/bin/up/passwd") == tree / "etc" / "passwd"  # '..' stops at the root
    assert resolve_in_root(tree, "/loop/x") is None
    assert resolve_in_root(tree, "/missing/x") is None


@pytest.mark.parametrize("content", [b"just some text, not a tar archive\n" * 40, b""])
def test_neither_directory_nor_tar(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "root.img"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"root\.img is neither a directory nor a tar archive"):
        user_root(path, tmp_path / "cache", lambda m: None)
    with pytest.raises(ImageError, match="does not exist"):
        user_root(tmp_path / "nope", tmp_path / "cache", lambda m: None)


@pytest.mark.skipif(not have_mkfs_erofs(), reason="mkfs.erofs (erofs-utils) is not installed")
def test_make_erofs_writes_a_reproducible_image_keeping_mtimes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "usr" / "lib" / "os.py").write_text("x = 1\n" * 100)
    os.utime(tree / "usr" / "lib" / "os.py", (1_000_000_000, 1_000_000_000))
    (tree / "sh").symlink_to("/bin/busybox")
    out = tmp_path / "out" / "root.erofs"
    make_erofs(tree, out, lambda m: None)
    data = out.read_bytes()
    assert struct.unpack_from("<I", data, 1024)[0] == 0xE0F5E1E2
    assert sorted(p.name for p in out.parent.iterdir()) == ["root.erofs"]  # no temporary left
    again = tmp_path / "again.erofs"
    make_erofs(tree, again, lambda m: None)
    assert again.read_bytes() == data
    if shutil.which("fsck.erofs"):
        subprocess.run(["fsck.erofs", f"--extract={tmp_path / 'x'}", str(out)], check=True, capture_output=True)
        assert (tmp_path / "x" / "usr" / "lib" / "os.py").stat().st_mtime == 1_000_000_000
        assert os.readlink(tmp_path / "x" / "sh") == "/bin/busybox"


def test_make_erofs_failure_carries_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "mkfs.erofs"
    fake.write_text("#!/bin/sh\necho 'mkfs: no space left' >&2\nexit 3\n")
    fake.chmod(0o755)
    out = tmp_path / "root.erofs"
    monkeypatch.setattr(rootfs, "_mkfs_erofs", lambda: str(fake))
    with pytest.raises(ImageError, match=r"mkfs\.erofs failed \(3\).*no space left"):
        make_erofs(tmp_path, out, lambda m: None)
    assert not out.exists() and not list(tmp_path.glob(".root.erofs*"))
