"""Host directory shares (virtio-9p) and host-userland mode (the host's / as the guest's
root, read-only under a tmpfs overlay), on real guests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import ConfigError, GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm.machine.config import Share, is_guest_own

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rw, ro = tmp_path_factory.mktemp("rw"), tmp_path_factory.mktemp("ro")
    (ro / "data.txt").write_text("from the host\n")
    return {"rw": rw, "ro": ro}


@pytest.fixture(scope="module")
def vm(microvm_image: GuestImage, dirs: dict[str, Path]) -> Iterator[MicroVM]:
    shares = {"/mnt/rw": dirs["rw"], "/srv/ro": Share(dirs["ro"], readonly=True)}
    with MicroVM(VMConfig(image=microvm_image, shares=shares)) as machine:
        yield machine


def test_the_host_sees_what_the_guest_writes_owned_by_the_host_user(vm: MicroVM, dirs: dict[str, Path]) -> None:
    vm.run("echo written in the guest > /mnt/rw/out.txt && mkdir /mnt/rw/sub", check=True)
    out = dirs["rw"] / "out.txt"
    assert out.read_text() == "written in the guest\n"
    assert out.stat().st_uid == os.getuid() and (dirs["rw"] / "sub").is_dir()


def test_the_guest_sees_what_the_host_writes_later(vm: MicroVM, dirs: dict[str, Path]) -> None:
    (dirs["rw"] / "late.txt").write_text("after boot\n")
    assert vm.run(["cat", "/mnt/rw/late.txt"], check=True).stdout == b"after boot\n"


def test_a_read_only_share_refuses_writes(vm: MicroVM, dirs: dict[str, Path]) -> None:
    assert vm.run(["cat", "/srv/ro/data.txt"], check=True).stdout == b"from the host\n"
    r = vm.run("echo no > /srv/ro/new.txt")
    assert r.exit_code != 0 and b"Read-only file system" in r.stderr
    r = vm.run("rm /srv/ro/data.txt")
    assert r.exit_code != 0
    assert sorted(p.name for p in dirs["ro"].iterdir()) == ["data.txt"]


def test_tmp_is_a_tmpfs_never_a_share(vm: MicroVM) -> None:
    assert vm.run(["stat", "-f", "-c", "%T", "/tmp"], check=True).stdout.strip() == b"tmpfs"
    # The 9p trap /tmp must not have: a file unlinked while open can still be fstat'ed.
    r = vm.run("exec 3>/tmp/f; rm /tmp/f; stat -L -c %s /proc/self/fd/3", check=True)
    assert r.stdout.strip() == b"0"


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ({"src": "/"}, "is not absolute"),
        ({"/src": "/no/such/dir"}, "does not exist"),
        ({"/": "/"}, "cannot be a share"),
        ({"/proc/x": "/"}, "cannot be a share"),
        ({"/a": "/", "/a/b": "/"}, "nest"),
        ({"/a": "/", "/a/": "/"}, "given twice"),
    ],
)
def test_bad_shares_fail_before_boot(shares: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VMConfig(shares=shares)


def test_share_specs_parse() -> None:
    assert Share.parse("/h:/g:ro") == ("/g", Share(Path("/h"), readonly=True))
    assert Share.parse("/h:/g") == ("/g", Share(Path("/h")))
    with pytest.raises(ConfigError, match="HOST:GUEST"):
        Share.parse("/only-one-part")


# ---- host-userland mode ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_vm(session_kernel: str | None) -> Iterator[MicroVM]:
    image = build_image(kernel=session_kernel, rootfs="host")
    # The guest sees the host's files everywhere but under its own /tmp, /run, /proc, /sys
    # and /dev: a checkout there (a CI clone in /tmp) comes in as a share at the same path.
    shares = {str(REPO): REPO} if is_guest_own(str(REPO)) else {}
    with MicroVM(VMConfig(image=image, rootfs="host", shares=shares)) as machine:
        yield machine


def test_host_mode_runs_the_hosts_python_with_the_project_importable(host_vm: MicroVM) -> None:
    code = "import sys, pytest_microvm.machine.config as c; print(sys.version.split()[0], c.__file__)"
    r = host_vm.run([sys.executable, "-c", code], cwd=str(REPO), timeout=120, check=True)
    version, path = r.stdout.decode().split()
    assert version == sys.version.split()[0]
    assert path == str(REPO / "pytest_microvm" / "machine" / "config.py")


def test_host_mode_starts_commands_in_the_hosts_working_directory(host_vm: MicroVM) -> None:
    here = os.getcwd()
    # A directory of the guest's own (/tmp) is seen only through a share at the same path.
    shared = any(here == guest or here.startswith(guest + "/") for guest in host_vm.config.shares)
    if is_guest_own(here) and not shared:
        assert host_vm.default_cwd is None
        assert host_vm.run(["pwd"], check=True).stdout == b"/\n"
    else:
        assert host_vm.run(["pwd"], check=True).stdout.decode().strip() == here


def test_host_mode_writes_stay_in_the_guest(host_vm: MicroVM) -> None:
    name = f"/usr/microvm-host-mode-{os.getpid()}"
    host_vm.run(f"echo guest > {name} && cat {name}", check=True)
    assert not os.path.exists(name)
    r = host_vm.run(["cat", "/proc/mounts"], check=True).stdout.decode()
    assert any(line.split()[1] == "/" and line.split()[2] == "overlay" for line in r.splitlines())
    assert host_vm.run(["stat", "-f", "-c", "%T", "/tmp"], check=True).stdout.strip() == b"tmpfs"
