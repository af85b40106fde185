"""The guest's own userland on real guests: distro packages, a user's root from a tar or a
directory, the EROFS root under a tmpfs overlay, and the initramfs fallback."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import GuestImage, ImageError, MicroVM, VMConfig, build_image
from pytest_microvm.image.sources import find_busybox

PY = """
import json, sqlite3
db = sqlite3.connect(":memory:")
db.execute("create table t(x)")
db.executemany("insert into t values (?)", [(1,), (2,), (3,)])
print(json.dumps({"sum": db.execute("select sum(x) from t").fetchone()[0], "sqlite": sqlite3.sqlite_version}))
"""


@pytest.fixture(scope="module")
def python_vm(session_kernel: str | None) -> Iterator[MicroVM]:
    image = build_image(kernel=session_kernel, packages=("python3",))
    with MicroVM(VMConfig(image=image, packages=("python3",))) as vm:
        yield vm


def test_packages_image_runs_python3_with_sqlite3_and_json(python_vm: MicroVM) -> None:
    r = python_vm.run(["python3", "-c", PY], timeout=120, check=True)
    assert b'"sum": 6' in r.stdout and b'"sqlite": "3.' in r.stdout


def test_packages_image_keeps_a_shell_and_the_everyday_tools(python_vm: MicroVM) -> None:
    r = python_vm.run("echo a > /tmp/f && cat /tmp/f && tail -n1 /tmp/f && stat -c %s /tmp/f", check=True)
    assert r.stdout == b"a\na\n2\n"


def test_the_root_is_erofs_under_a_writable_overlay(python_vm: MicroVM) -> None:
    mounts = python_vm.run(["cat", "/proc/mounts"], check=True).stdout.decode().splitlines()
    assert any(m.split()[1] == "/" and m.split()[2] == "overlay" for m in mounts)
    python_vm.run("echo x > /usr/lib/written-by-a-test && cat /usr/lib/written-by-a-test", check=True)
    assert python_vm.run(["stat", "-f", "-c", "%T", "/tmp"], check=True).stdout.strip() == b"tmpfs"
    assert python_vm.run(["test", "-x", "/usr/bin/microvm-agent"]).exit_code == 0


def test_python_bytecode_was_compiled_at_build_time(python_vm: MicroVM) -> None:
    r = python_vm.run("ls /usr/lib/python3*/__pycache__/ | grep -c '^os\\.cpython-.*\\.pyc$'", check=True)
    assert r.stdout.strip() == b"1"


# ---- a user's root ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root of a user's: static busybox as /bin/sh, and a file to recognise it by."""
    root = tmp_path_factory.mktemp("userroot") / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    busybox = find_busybox(Path(os.environ.get("MICROVM_CACHE_DIR", Path.home() / ".cache/pytest-microvm")), print)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    for applet in ("sh", "cat", "ls", "stat", "mount", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "os-release").write_text("NAME=user-root\n")
    return root


def _listing(root: Path) -> str:
    entries = sorted((str(p.relative_to(root)), p.lstat().st_mode, p.lstat().st_mtime_ns) for p in root.rglob("*"))
    return hashlib.sha256(repr(entries).encode()).hexdigest()


def test_rootfs_from_a_tar(session_kernel: str | None, user_tree: Path, tmp_path: Path) -> None:
    tar = tmp_path / "root.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(user_tree, arcname=".")
    image = build_image(kernel=session_kernel, rootfs=tar)
    assert image.root_kind == "erofs"
    with MicroVM(VMConfig(image=image, rootfs=str(tar))) as vm:
        assert vm.run(["cat", "/etc/os-release"], check=True).stdout == b"NAME=user-root\n"
        r = vm.run("echo $0; ls /usr/bin", check=True)
        assert r.stdout.split() == [b"/bin/sh", b"microvm-agent"]


def test_rootfs_from_a_directory_leaves_it_untouched(
    session_kernel: str | None, user_tree: Path, tmp_path: Path
) -> None:
    before = _listing(user_tree)
    image = build_image(kernel=session_kernel, rootfs=user_tree)
    with MicroVM(VMConfig(image=image, rootfs=str(user_tree))) as vm:
        vm.run("echo changed > /etc/os-release && mkdir -p /usr/new", check=True)
        assert vm.run(["cat", "/etc/os-release"], check=True).stdout == b"changed\n"
    assert _listing(user_tree) == before
    assert (user_tree / "etc" / "os-release").read_text() == "NAME=user-root\n"


def test_without_mkfs_erofs_the_root_goes_into_the_initramfs(
    session_kernel: str | None, user_tree: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pytest_microvm.image import rootfs

    monkeypatch.setattr(rootfs, "have_mkfs_erofs", lambda: False)
    said: list[str] = []
    image = build_image(kernel=session_kernel, rootfs=user_tree, progress=said.append)
    assert image.root_kind == "initramfs" and image.root_disk is None
    assert any("mkfs.erofs is missing" in m and "guest RAM" in m for m in said)
    with MicroVM(VMConfig(image=image, rootfs=str(user_tree))) as vm:
        assert vm.run(["cat", "/etc/os-release"], check=True).stdout == b"NAME=user-root\n"


def test_a_vm_refuses_an_image_built_for_another_root(microvm_image: GuestImage) -> None:
    from pytest_microvm import ConfigError

    with pytest.raises(ConfigError, match="was not built for packages"):
        MicroVM(VMConfig(image=microvm_image, packages=("python3",))).start()


def test_packages_and_rootfs_do_not_combine(user_tree: Path) -> None:
    with pytest.raises(ImageError, match="do not combine"):
        build_image(packages=("python3",), rootfs=user_tree)
    with pytest.raises(ImageError, match="the ssh feature"):
        build_image(rootfs=user_tree, features=("ssh",))


def test_a_root_disk_that_cannot_be_mounted_fails_the_boot_loudly(
    session_kernel: str | None, user_tree: Path, tmp_path: Path
) -> None:
    import dataclasses
    import time

    from pytest_microvm import BootError

    image = build_image(kernel=session_kernel, rootfs=user_tree)
    garbage = tmp_path / "garbage.erofs"
    garbage.write_bytes(os.urandom(1 << 20))
    broken = dataclasses.replace(image, root_disk=garbage)
    start = time.monotonic()
    with pytest.raises(BootError) as info:
        MicroVM(VMConfig(image=broken, rootfs=str(user_tree))).start()
    assert "microvm-agent: FATAL: mounting the root disk /dev/vda (erofs) as EROFS failed" in info.value.console_tail
    assert time.monotonic() - start < 60  # the guest powered off; no wait for the boot timeout
