"""The suite's outcome does not depend on how pytest was started, and SIGTERM stops it cleanly.

A script that starts pytest in the background (``cmd &``, ``nohup``, several CI runners
and job schedulers) hands it SIGINT and SIGQUIT ignored; so do its children. Such a run
is stopped by SIGTERM, which must unwind like Ctrl-C: VMs stopped, nothing left running,
no work directory left (guest RAM is a memfd: it has no name to leave).
"""

from __future__ import annotations

import contextlib
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
from tests.signals import ignored, ignoring

REPO = Path(__file__).resolve().parents[2]

# The tests that once failed when the suite ignored SIGINT (each sends a SIGINT, or ran
# after a test that leaked a process), in an order that puts the leaker before the last.
ONCE_FAILED = [
    "tests/unit/test_agent_exec.py::test_kill_a_running_process",
    "tests/unit/test_agent_exec.py::test_pty_gives_a_controlling_terminal_with_size_and_interrupt",
    "tests/unit/test_kernel_build.py::test_ctrl_c_during_make_stops_the_compilers_too",
    "tests/integration/test_plugin_vms.py::test_sigint_during_boot_leaves_nothing_behind",
    "tests/unit/test_layering.py::test_no_import_cycles_between_modules",
]


def _cache_env(image: GuestImage, session_kernel: str | None) -> dict[str, str]:
    env = {**os.environ, "MICROVM_CACHE_DIR": str(image.directory.parents[1]), "PYTHONFAULTHANDLER": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_the_suite_passes_when_started_with_sigint_ignored(
    microvm_image: GuestImage, session_kernel: str | None
) -> None:
    kernel = ["--microvm-kernel", session_kernel] if session_kernel else []
    probe = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/status').read())"],
        capture_output=True, preexec_fn=ignoring(), check=True,
    )  # fmt: skip
    assert {signal.SIGINT, signal.SIGQUIT} <= ignored(probe.stdout)  # the setup is what a script's `cmd &` gives
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *kernel, *ONCE_FAILED],
        cwd=REPO, env=_cache_env(microvm_image, session_kernel), capture_output=True, timeout=900,
        stdin=subprocess.DEVNULL, preexec_fn=ignoring(),
    )  # fmt: skip
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0 and f"{len(ONCE_FAILED)} passed" in out, out[-6000:]


SLEEPER = """
import os, time
from pathlib import Path

def test_holds_a_vm_{i}(microvm):
    assert microvm.run("true").exit_code == 0
    Path(os.environ["MARKERS"], "{i}").write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    time.sleep(600)
"""


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "xdist"])
def test_sigterm_to_pytest_stops_every_vm_and_leaves_nothing(
    pytester: pytest.Pytester, microvm_image: GuestImage, session_kernel: str | None, workers: int
) -> None:
    tests = max(1, workers)
    for i in range(tests):
        pytester.makepyfile(**{f"test_sleeper{i}": SLEEPER.format(i=i)})
    workroot = Path(tempfile.mkdtemp(prefix="term-", dir="/tmp"))  # short: sockets live here too
    markers = workroot / "markers"
    markers.mkdir()
    kernel = ["--microvm-kernel", session_kernel] if session_kernel else []
    xdist = ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    # As a script's background job: SIGINT ignored, so SIGTERM is the way to stop it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *xdist, *kernel, str(pytester.path)],
        cwd=pytester.path, env={**_cache_env(microvm_image, session_kernel), "TMPDIR": str(workroot),
                                "MARKERS": str(markers)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=ignoring(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(markers.iterdir())) < tests:  # every test holds its VM
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the tests never held their VMs; pytest said:\n{proc.communicate()[0].decode()[-4000:]}")
            time.sleep(0.1)
        assert any("qemu-system" in c for c in processes_mentioning(str(workroot)).values())
        proc.send_signal(signal.SIGTERM)  # to pytest alone, as `kill PID` does
        try:
            out = proc.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            pytest.fail(f"pytest did not exit within 90s of SIGTERM:\n{proc.communicate()[0].decode()[-8000:]}")
        assert proc.returncode == pytest.ExitCode.INTERRUPTED, out[-4000:]
        assert "SIGTERM" in out, out[-4000:]
        # Every VM was stopped by its own teardown, not only killed with its process:
        # then its work directory is gone too.
        left = [p.name for p in workroot.iterdir() if p.name.startswith(("microvm-", "mvm-"))]
        assert left == [], f"left behind: {left}\n{out[-4000:]}"
        assert processes_mentioning(str(workroot)) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in processes_mentioning(str(workroot)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workroot, ignore_errors=True)


HOLDER = """
import os, time
from pathlib import Path

def test_holds_eight_vms_{i}(microvm_factory):
    vms = [microvm_factory() for _ in range(8)]
    assert all(vm.run("true").exit_code == 0 for vm in vms)
    Path(os.environ["MARKERS"], "{i}").write_text(" ".join(str(vm.qemu.pid) for vm in vms))
    time.sleep(600)
"""


def _fork_servers_without_their_process() -> list[str]:
    """Fork servers whose process (``--for-pid``) is gone: they should have ended with it."""
    orphans = []
    for pid, cmdline in processes_mentioning("pytest_microvm.channel.vhost_user.forkserver").items():
        owner = cmdline.split("--for-pid ")[1].split()[0] if "--for-pid " in cmdline else ""
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            orphans.append(f"{pid}: {cmdline}")
    return orphans


def test_sigkill_of_pytest_holding_16_vms_leaves_nothing_running(
    pytester: pytest.Pytester, microvm_image: GuestImage, session_kernel: str | None
) -> None:
    for i in range(2):
        pytester.makepyfile(**{f"test_holder{i}": HOLDER.format(i=i)})
    workroot = Path(tempfile.mkdtemp(prefix="kill-", dir="/tmp"))  # short: sockets live here too
    markers = workroot / "markers"
    markers.mkdir()
    kernel = ["--microvm-kernel", session_kernel] if session_kernel else []
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", *kernel, str(pytester.path)],
        cwd=pytester.path, env={**_cache_env(microvm_image, session_kernel), "TMPDIR": str(workroot),
                                "MARKERS": str(markers)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the controller and its workers
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # 16 VMs on a loaded 2-core host under TCG
        while len(list(markers.iterdir())) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the tests never held their VMs; pytest said:\n{proc.communicate()[0].decode()[-4000:]}")
            time.sleep(0.2)
        qemus = [int(p) for m in markers.iterdir() for p in m.read_text().split()]
        assert len(set(qemus)) == 16 and all(Path(f"/proc/{p}").exists() for p in qemus)
        os.killpg(proc.pid, signal.SIGKILL)  # no teardown, no atexit: what a killed CI job gets
        proc.communicate(timeout=30)
        # The kernel ends the rest: QEMU and the fork servers by their parent's death, each
        # backend by its fork server's.
        deadline = time.monotonic() + 30
        while (processes_mentioning(str(workroot)) or _fork_servers_without_their_process()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert processes_mentioning(str(workroot)) == {}
        assert _fork_servers_without_their_process() == []
        shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        assert shm_after - shm_before == set()  # guest RAM is memfds: nothing has a name to leave
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        for pid in processes_mentioning(str(workroot)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workroot, ignore_errors=True)
