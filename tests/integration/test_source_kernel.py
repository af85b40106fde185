"""The kernel built from Debian's source (build_image(kernel="source")) booted for real.

Its drivers are built in: the image carries no modules, and everything the Debian
image does through modules (vsock, virtio-serial, virtio-net, ptys) must work without.
CI builds this kernel up front in .ci/run; elsewhere the first run builds it (minutes).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm.machine import network


@pytest.fixture(scope="module")
def source_image(microvm_image: GuestImage, pytestconfig: pytest.Config) -> GuestImage:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def progress(message: str) -> None:  # a first build takes minutes: say what it is doing
        if reporter is not None:
            reporter.write_line(f"source kernel: {message}")

    return build_image(kernel="source", cache=microvm_image.directory.parents[1], progress=progress)


@pytest.fixture(scope="module")
def vm(source_image: GuestImage) -> Iterator[MicroVM]:
    with MicroVM(VMConfig(image=source_image, network=True)) as machine:
        yield machine


def test_the_image_boots_its_own_kernel_with_no_modules(vm: MicroVM, source_image: GuestImage) -> None:
    assert source_image.modules == () and source_image.pvh
    assert vm.run(["uname", "-r"], check=True).stdout.decode().strip() == source_image.kernel_release
    assert not vm.run(["test", "-e", "/proc/modules"]).ok  # no module support at all: nothing to load
    assert re.fullmatch(r"\d+\.\d+\.\d+", source_image.kernel_release)  # the source's own release, no suffix


def test_files_and_a_terminal_work_without_modules(vm: MicroVM, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    vm.write_file("/tmp/blob", data)
    assert vm.read_file("/tmp/blob") == data
    proc = vm.start_process(["tty"], pty=(24, 80))
    assert proc.wait(timeout=30).stdout.startswith(b"/dev/pts/")


def test_the_built_in_nic_reaches_the_host(vm: MicroVM) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"hello from the host\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        r = vm.run(["nc", network.GATEWAY, str(port)], timeout=60)
        thread.join(10)
    assert r.stdout == b"hello from the host\n", r.stderr


def test_a_guest_tcp_service_is_reachable_through_vsock(vm: MicroVM) -> None:
    vm.start_process("exec nc -ll -p 7000 -e echo served")
    with vm.tcp(7000) as conn:
        conn.settimeout(30)
        assert conn.recv(100) == b"served\n"


def test_the_cli_runs_a_command_on_the_source_kernel(source_image: GuestImage) -> None:
    env = {**os.environ, "MICROVM_CACHE_DIR": str(source_image.directory.parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "run", "--kernel", "source", "--", "uname", "-r"],
        capture_output=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert (run.returncode, run.stdout.decode().strip()) == (0, source_image.kernel_release), run.stderr
    doctor = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "doctor", "--kernel", "source"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert "[ok] kernel build" in doctor.stdout and "built from Debian's linux-source-" in doctor.stdout, doctor.stdout
