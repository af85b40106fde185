"""The plugin as a user meets it: pytester runs that boot real guests in a pytest subprocess."""

from __future__ import annotations

import contextlib
import json
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
from tests.signals import defaults

SUITE = """
import os
import pytest

def test_fixture_runs_commands(microvm):
    r = microvm.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\\n", b"err\\n", 7)
    with open(os.environ["PIDS_FILE"], "a") as f:
        f.write(" ".join(map(str, microvm.pids)) + "\\n")

@pytest.mark.microvm(memory_mib=160, kernel_cmdline=("marker.seen=1",))
def test_marker_configures_the_vm(microvm):
    assert microvm.config.memory_mib == 160
    total_kib = int(microvm.run("grep MemTotal /proc/meminfo").stdout.split()[1])
    assert 100 * 1024 < total_kib < 160 * 1024
    assert b"marker.seen=1" in microvm.read_file("/proc/cmdline")

def test_hooks_were_called(microvm):
    assert "-name" in microvm.qemu.argv          # pytest_microvm_qemu_args
    assert microvm.ready_by_hook                   # pytest_microvm_ready
    assert microvm.config.extra["from_hook"]      # pytest_microvm_config

def test_factory_boots_two(microvm_factory):
    a, b = microvm_factory(), microvm_factory(memory_mib=192)
    assert a.run("hostname").stdout == b.run("hostname").stdout == b"microvm\\n"
    assert b.config.memory_mib == 192

def test_failure_attaches_the_console(microvm):
    microvm.run("echo I-WAS-HERE > /dev/console")
    assert False, "deliberate"
"""

CONFTEST = """
def pytest_microvm_qemu_args(config, argv):
    return [*argv, "-name", "from-hook"]

def pytest_microvm_ready(vm):
    vm.ready_by_hook = True

def pytest_microvm_config(config, request):
    return config.with_(extra={"from_hook": True})
"""


@pytest.fixture
def shared_cache(microvm_image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester gives each run a fresh HOME; point it at the session's image cache instead
    of building (and downloading) the whole image again."""
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(microvm_image.directory.parents[1]))


def test_plugin_end_to_end(pytester: pytest.Pytester, tmp_path: Path, shared_cache: None) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    pids_file = tmp_path / "pids"
    os.environ["PIDS_FILE"] = str(pids_file)
    try:
        result = pytester.runpytest_subprocess("--strict-markers", "-p", "no:cacheprovider", timeout=600)
    finally:
        del os.environ["PIDS_FILE"]
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        [
            "microvm: * guests; QEMU *; accel=*",
            "*- microvm vm console (tail) -*",
            "*I-WAS-HERE*",
        ]
    )
    # The VM of the first test was torn down: its QEMU and backend are gone.
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_xdist_two_workers_six_vms(pytester: pytest.Pytester, shared_cache: None) -> None:
    pytester.makepyfile(
        test_many="""
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_vm(microvm, i):
            assert microvm.run(["echo", str(i)]).stdout == f"{i}\\n".encode()
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=6)


def test_sigint_during_boot_leaves_nothing_behind(pytester: pytest.Pytester, shared_cache: None) -> None:
    pytester.makepyfile(test_slow="def test_boot(microvm):\n    microvm.run(['sleep', '60'])\n")
    # Short, so the VM's sockets live in it too and every process of the VM names it.
    workroot = Path(tempfile.mkdtemp(prefix="sigint-", dir="/tmp"))
    # Every VM directory (and so QEMU's argv) lands in TMPDIR; faulthandler lets a hang say where.
    env = {**os.environ, "TMPDIR": str(workroot), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(pytester.path)],
        cwd=pytester.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=defaults(),  # Ctrl-C from a terminal: SIGINT at its default, whatever the suite inherited
    )
    try:
        _interrupt_during_boot(proc, workroot)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)  # also when the test fails


def _interrupt_during_boot(proc: subprocess.Popen[bytes], workroot: Path) -> None:
    try:
        deadline = time.monotonic() + 120
        while not any("qemu-system" in c for c in processes_mentioning(str(workroot)).values()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"QEMU never started; pytest said:\n{proc.communicate()[0].decode()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C while the guest boots
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            pytest.fail(f"pytest did not exit within 60s of Ctrl-C:\n{proc.communicate()[0].decode()[-8000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert b"KeyboardInterrupt" in out or proc.returncode == 2, out[-2000:]
    deadline = time.monotonic() + 10
    while processes_mentioning(str(workroot)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(workroot)) == {}
    assert [p.name for p in workroot.iterdir() if p.name.startswith("microvm-")] == []


def test_keep_on_failure_leaves_the_vm_up_and_says_how_to_reach_it(
    pytester: pytest.Pytester, shared_cache: None
) -> None:
    pytester.makepyfile(
        test_keep="""
        def test_pass(microvm):
            pass

        def test_fail(microvm):
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--microvm-keep-on-failure", "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=1, failed=1)
    text = "\n".join(result.outlines)
    result.stdout.fnmatch_lines(
        ["*- microvm vm kept running -*", "state: */vm.json*", "reach it: microvm attach *", "stop it: microvm stop *"]
    )
    by_hand = next(line for line in result.outlines if line.startswith("  (by hand: kill "))
    pids = [int(p) for p in by_hand.removeprefix("  (by hand: kill ").split(";")[0].split()]
    workdir = Path(by_hand.split("rm -r ")[1].rstrip(")"))
    try:
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids), text[-2000:]
        state = json.loads((workdir / "vm.json").read_text())
        assert state["qemu_pid"] in pids and state["token"]
        # microvm attach reaches the kept VM: the agent reconnects, a command runs in it.
        attach = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest_microvm.cli",
                "attach",
                str(workdir),
                "--",
                "sh",
                "-c",
                "echo attached; exit 4",
            ],
            capture_output=True,
            timeout=120,
        )
        assert (attach.returncode, attach.stdout) == (4, b"attached\n"), attach.stderr
        # microvm stop ends both processes and removes the directory.
        stop = subprocess.run([sys.executable, "-m", "pytest_microvm.cli", "stop", str(workdir)], timeout=60)
        assert stop.returncode == 0
        assert not any(Path(f"/proc/{p}").exists() for p in pids) and not workdir.exists()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
        if "sockets" in locals().get("state", {}):
            shutil.rmtree(state["sockets"], ignore_errors=True)
