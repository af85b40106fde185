"""Guests of another architecture than the host's (aarch64 on an x86_64 host, x86_64 on an
arm64 one), under TCG: what a test does works the same as on the host's own.

The host's own architecture is what the rest of the suite boots; here every test takes
the ``arch`` parameter, one value per other supported architecture. `-m foreign_arch`
runs these alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm import arch as arches
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.sources import find_busybox
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.snapshot.strategies import RestoreClone
from tests.integration.paths import needs_kernel_path

FOREIGN = [a for a in arches.NAMES if a != arches.host_name()]
pytestmark = pytest.mark.foreign_arch


@pytest.fixture(scope="module", params=FOREIGN)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def cache(microvm_image: GuestImage) -> Path:
    return microvm_image.directory.parents[1]


@pytest.fixture(scope="module")
def kernel(session_kernel: str | None) -> str:
    """The session's kernel where it names one for every architecture (a run with
    --microvm-kernel source tests the cross-built one); a kernel file is the host's."""
    return session_kernel if session_kernel in ("debian", "source") else "debian"


@pytest.fixture(scope="module")
def image(arch: str, cache: Path, kernel: str) -> GuestImage:
    """That architecture's kernel and busybox, the agent cross-compiled."""
    built = build_image(arch=arch, cache=cache, kernel=kernel)
    assert built.arch == arch and built.kernel.name == ("Image" if arch == "aarch64" else "vmlinux")
    return built


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def vm(image: GuestImage, shared: Path) -> Iterator[MicroVM]:
    with MicroVM(VMConfig(image=image, arch=image.arch, shares={"/mnt/host": shared}), name="foreign") as machine:
        yield machine


def _out(vm: MicroVM, command: str) -> str:
    return vm.run(["sh", "-c", command], check=True).stdout.decode().strip()


def test_the_guest_is_that_architecture_under_tcg(vm: MicroVM, arch: str) -> None:
    assert _out(vm, "uname -m") == arch
    assert vm.choice is not None and vm.choice.accel == "tcg"
    assert "KVM runs only" in vm.choice.why  # said, not silent
    console = "ttyAMA0" if arch == "aarch64" else "ttyS0"
    assert f"console={console}" in _out(vm, "cat /proc/cmdline")


def test_commands_exit_codes_and_streams(vm: MicroVM) -> None:
    r = vm.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    assert [vm.run([c]).exit_code for c in ("true", "false")] == [0, 1]


def test_stdin_round_trip(vm: MicroVM) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    r = vm.run(["sha256sum"], stdin=data, check=True)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_files_both_ways(vm: MicroVM) -> None:
    data = os.urandom(200_000)
    vm.write_file("/tmp/blob", data, mode=0o600)
    assert vm.read_file("/tmp/blob") == data
    assert _out(vm, "stat -c %a /tmp/blob") == "600"


def test_share_is_read_and_written(vm: MicroVM, shared: Path) -> None:
    (shared / "from-host").write_text("hello guest\n")
    assert _out(vm, "cat /mnt/host/from-host") == "hello guest"
    _out(vm, "echo hello host > /mnt/host/from-guest")
    assert (shared / "from-guest").read_text() == "hello host\n"


def test_packages_are_that_architectures(arch: str, cache: Path, kernel: str) -> None:
    image = build_image(arch=arch, cache=cache, kernel=kernel, packages=("python3",))
    with MicroVM(VMConfig(image=image, arch=arch, packages=("python3",)), name="py") as vm:
        out = _out(
            vm,
            "python3 -c 'import platform; print(platform.machine())'; "
            "od -An -tx1 -j18 -N2 $(readlink -f $(command -v python3))",  # e_machine
        )
    machine, e_machine = out.split("\n")
    assert machine == arch
    assert int("".join(reversed(e_machine.split())), 16) == arches.get(arch).elf_machine


def test_rootfs_tar(arch: str, cache: Path, kernel: str, tmp_path: Path) -> None:
    """A root of the user's own, as a tar: that architecture's static busybox and a file."""
    busybox = find_busybox(cache, lambda _m: None, Apt(arches.get(arch), cache))
    tar_path = tmp_path / "root.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(busybox, "bin/busybox")
        for name, target in (("bin/sh", "busybox"), ("bin/cat", "busybox"), ("bin/uname", "busybox")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        marker = b"my own root\n"
        info = tarfile.TarInfo("etc/marker")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
    image = build_image(arch=arch, cache=cache, kernel=kernel, rootfs=tar_path)
    assert image.root_kind == "erofs"
    with MicroVM(VMConfig(image=image, arch=arch, rootfs=str(tar_path)), name="tar") as vm:
        assert _out(vm, "cat /etc/marker; uname -m") == f"my own root\n{arch}"


def test_clones_through_the_plugin_are_their_own(
    arch: str, image: GuestImage, microvm_factory: Callable[..., MicroVM]
) -> None:
    a = microvm_factory(arch=arch, image=image)
    b = microvm_factory(arch=arch, image=image)
    for vm in (a, b):
        assert vm.cloned and isinstance(vm.launch, RestoreClone), f"{vm.name} booted instead of cloning"
        assert _out(vm, "uname -m") == arch
        before = time.time()
        assert int(before) - 1 <= int(_out(vm, "date +%s")) <= time.time() + 1, "the clone's clock is not the host's"
    assert a.launch.template.key == b.launch.template.key  # type: ignore[attr-defined]
    assert a.token != b.token
    assert _out(a, "head -c 16 /dev/urandom | od -An -tx1") != _out(b, "head -c 16 /dev/urandom | od -An -tx1")
    _out(a, "echo a > /tmp/mine")
    assert _out(b, "test -e /tmp/mine && echo seen || echo fresh") == "fresh"


@pytest.mark.microvm(snapshot=False)
def test_marker_and_factory_take_arch(arch: str, microvm_factory: Callable[..., MicroVM]) -> None:
    vm = microvm_factory(arch=arch)
    assert vm.config.arch == arch and not vm.cloned
    assert _out(vm, "uname -m") == arch


def test_ssh_over_vsock(arch: str, cache: Path, kernel: str) -> None:
    image = build_image(arch=arch, cache=cache, kernel=kernel, features=("ssh",))
    with MicroVM(VMConfig(image=image, arch=arch), name="ssh") as vm:
        client: paramiko.SSHClient = vm.ssh(timeout=300)
        _stdin, stdout, _stderr = client.exec_command("uname -m; exit 4", timeout=120)
        assert stdout.read() == f"{arch}\n".encode()
        assert stdout.channel.recv_exit_status() == 4
        client.close()


def test_cli_run(arch: str, image: GuestImage, cache: Path, kernel: str) -> None:
    env = {**os.environ, "MICROVM_CACHE_DIR": str(cache)}
    run = [sys.executable, "-m", "pytest_microvm.cli", "run", "--arch", arch, "--kernel", kernel]
    proc = subprocess.run(
        [*run, "--", "sh", "-c", "uname -m; exit 5"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert (proc.stdout, proc.returncode) == (f"{arch}\n", 5), proc.stderr
    assert "KVM runs only" in proc.stderr  # TCG, said loudly


@needs_kernel_path
def test_kernel_path_boot_and_clone(arch: str, image: GuestImage) -> None:
    """The kernel's vhost-vsock serves a guest of any architecture (TCG): boot, then clones
    that keep their device."""
    config = VMConfig(image=image, arch=arch, vsock="kernel")
    with MicroVM(config.with_(snapshot=False), name="kboot") as vm:
        assert _out(vm, "uname -m") == arch and vm.choice is not None and vm.choice.vsock == "kernel"
    templates = Templates()
    clones = [templates.start(config, name=f"kclone{i}") for i in range(2)]
    try:
        assert all(c.cloned for c in clones)
        assert len({_out(c, "head -c 16 /dev/urandom | od -An -tx1") for c in clones}) == 2
        assert len({c.token for c in clones}) == 2
    finally:
        for c in clones:
            c.stop()
