"""`microvm run` as a user runs it: a subprocess that boots a real guest."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytest_microvm import GuestImage
from tests.agent_harness import processes_mentioning
from tests.integration.paths import path_params


def microvm(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", *args], capture_output=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_run_streams_output_and_exits_with_the_commands_status(microvm_image: GuestImage) -> None:
    proc = microvm("run", "--", "sh", "-c", "printf 'out\\n'; printf 'err\\n' >&2; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == b"out\n"
    assert proc.stderr.endswith(b"err\n")


def test_run_reports_death_by_signal_as_128_plus_n(microvm_image: GuestImage) -> None:
    assert microvm("run", "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9


def test_run_forwards_a_pipe_byte_exact_and_its_end_closes_the_commands_stdin(microvm_image: GuestImage) -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\x00\r\n\x04 no newline at the end"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "run", "--", "sha256sum"],
        input=data, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_run_forwards_a_file_and_a_command_that_reads_nothing_still_ends(
    microvm_image: GuestImage, tmp_path: Path
) -> None:
    source = tmp_path / "input"
    source.write_bytes(b"line one\nline two\n")
    with source.open("rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_microvm.cli", "run", "--", "sh", "-c", "wc -l; read x || echo EOF"],
            stdin=stdin, capture_output=True, timeout=300,
        )  # fmt: skip
    assert (proc.returncode, proc.stdout.split()) == (0, [b"2", b"EOF"]), proc.stderr
    # 8 MB the command never reads: the run ends with the command, not with our input.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "run", "--", "true"],
        input=bytes(8 * 1024 * 1024), capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_run_n_leaves_stdin_to_the_script_that_loops_over_it(microvm_image: GuestImage, tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("alpha\nbeta\ngamma\n")
    loop = 'while read h; do "$0" -m pytest_microvm.cli run {flag} -- echo "got $h"; done < hosts'
    with_n = subprocess.run(
        ["sh", "-c", loop.format(flag="-n"), sys.executable], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert with_n.stdout.decode().split("\n") == ["got alpha", "got beta", "got gamma", ""], with_n.stderr
    # Without -n the first run forwards (and so swallows) the rest of the list: what -n is for.
    without = subprocess.run(
        ["sh", "-c", loop.format(flag=""), sys.executable], cwd=tmp_path, capture_output=True, timeout=300
    )
    assert without.stdout == b"got alpha\n", without.stderr


def test_run_without_a_command_is_a_usage_error() -> None:
    proc = microvm("run")
    assert proc.returncode == 2 and b"nothing to run" in proc.stderr


def test_sigterm_or_sighup_to_the_cli_leaves_nothing_behind(microvm_image: GuestImage, tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a script stopping it; a closed terminal
        workroot = Path(tempfile.mkdtemp(prefix="cli-", dir="/tmp"))  # short: sockets live here too
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_microvm.cli", "run", "--", "sleep", "60"],
            env={**os.environ, "TMPDIR": str(workroot)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while not list(workroot.glob("microvm-*/vm.json")):  # written once the VM is ready
                assert proc.poll() is None and time.monotonic() < deadline, "the VM never came up"
                time.sleep(0.1)
            proc.send_signal(sig)
            assert proc.wait(60) != 0
            assert list(workroot.iterdir()) == [], f"{sig.name} left {list(workroot.iterdir())}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(workroot, ignore_errors=True)  # also when the test fails


@pytest.mark.parametrize("path", path_params())
def test_run_keep_then_attach_then_stop(microvm_image: GuestImage, session_kernel: str | None, path: str) -> None:
    workroot = Path(tempfile.mkdtemp(prefix="keep-", dir="/tmp"))
    env = {**os.environ, "TMPDIR": str(workroot)}
    kernel = ["--kernel", session_kernel] if session_kernel else []
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_microvm.cli", "run", "--keep", "--network", "--vsock", path, *kernel,
             "--", "echo", "first"],
            capture_output=True, timeout=600, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        assert (proc.returncode, proc.stdout) == (0, b"first\n"), proc.stderr
        (workdir,) = workroot.glob("microvm-*")
        assert f"microvm attach {workdir}".encode() in proc.stderr
        # QEMU (and the userspace path's vsock backend) outlived the CLI.
        assert len(processes_mentioning(str(workroot))) == (2 if path == "userspace" else 1)
        attached = microvm("attach", str(workdir), "--", "cat", "/sys/class/net/eth0/operstate")
        assert (attached.returncode, attached.stdout) == (0, b"up\n"), attached.stderr
        stopped = microvm("stop", str(workdir))
        assert stopped.returncode == 0, stopped.stderr
        assert processes_mentioning(str(workroot)) == {}
        # Nothing of the VM is left; the kernel path's CID lock directory is shared by all VMs.
        assert [p.name for p in workroot.iterdir()] in ([], [f"pytest-microvm-{os.getuid()}"])
    finally:
        for pid in processes_mentioning(str(workroot)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workroot, ignore_errors=True)


def test_attach_and_stop_say_when_there_is_no_kept_vm(tmp_path: Path) -> None:
    for command in ("attach", "stop"):
        proc = microvm(command, str(tmp_path / "gone"))
        assert proc.returncode == 1 and b"cannot read the VM state" in proc.stderr, proc.stderr


def test_run_with_the_host_root_and_a_share(microvm_image: GuestImage, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("shared\n")
    # The host's own /etc/os-release (the busybox image has none) proves the host root.
    script = "cat /data/in.txt && echo out > /data/out.txt && cat /etc/os-release"
    proc = microvm("run", "--rootfs", "host", "--share", f"{tmp_path}:/data", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"shared\n" + Path("/etc/os-release").read_bytes()
    assert (tmp_path / "out.txt").read_text() == "out\n"


def test_run_with_bad_roots_or_shares_fails_before_booting() -> None:
    for args, message, status in (
        (["--share", "/no/such/dir:/x"], b"host path /no/such/dir does not exist", 1),
        (["--share", "/tmp:relative"], b"is not absolute", 1),
        (["--packages", "no-such-package-microvm"], b"no-such-package-microvm", 1),
        # A value the option itself refuses is a usage error, as argparse's own are: status 2.
        (["--rootfs", "/no/such/root.tar"], b"--rootfs: /no/such/root.tar does not exist", 2),
    ):
        start = time.monotonic()
        proc = microvm("run", *args, "--", "true")
        assert proc.returncode == status and message in proc.stderr, (args, proc.stderr)
        assert b"error: " in proc.stderr and b"Traceback" not in proc.stderr
        assert time.monotonic() - start < 30
