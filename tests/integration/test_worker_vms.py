"""``--microvm-workers N``: the xdist workers themselves run in VMs, started through xdist's
own popen gateway by ``microvm run`` (pytester runs that boot real worker VMs)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_microvm import GuestImage

SUITE = """
import os, pathlib
from pytest_microvm.workers import in_guest, in_worker_vm

def test_passes_in_a_guest():
    assert in_guest() and in_worker_vm() and "microvm.root=9p:hostroot" in open("/proc/cmdline").read()
    # For the host to read: the rootdir is shared read-write at the same path.
    worker = os.environ["PYTEST_XDIST_WORKER"]
    pathlib.Path(f"boot-{worker}.txt").write_text(open("/proc/sys/kernel/random/boot_id").read())

def test_fails_with_its_message():
    print("captured-in-the-guest")
    assert 1 + 1 == 3, "the-failure-message-from-the-guest"

def test_boots_a_vm_inside(microvm):
    pass
"""


@pytest.fixture
def shared_cache(microvm_image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    # Read by the `microvm run` that starts each worker VM, which inherits our environment.
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(microvm_image.directory.parents[1]))


def test_two_worker_vms_bring_back_passes_failures_and_files(
    pytester: pytest.Pytester, shared_cache: None, session_kernel: str | None
) -> None:
    pytester.makepyfile(test_in_vms=SUITE)
    kernel = ["--microvm-kernel", session_kernel] if session_kernel else []
    result = pytester.runpytest_subprocess(
        "--microvm-workers", "2", *kernel, "-p", "no:cacheprovider", "--junitxml=report.xml", timeout=600
    )
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "microvm: the xdist workers run in 2 VMs (the host's userland; * shared read-write at the same path)",
            "created: 2/2 workers",
            "*microvm: this test boots a VM, and it runs inside a VM (a --microvm-workers worker) without usable KVM*",
            "*AssertionError: the-failure-message-from-the-guest*",
            "*captured-in-the-guest*",  # the failed test's captured stdout, through xdist
        ],
        consecutive=False,
    )
    # What the worker wrote in the shared rootdir is on the host, written in another kernel.
    (boot_file,) = pytester.path.glob("boot-gw*.txt")
    assert boot_file.read_text() != Path("/proc/sys/kernel/random/boot_id").read_text()
    # --junitxml is the controller's, on the host, with the guest's failure in it.
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "report.xml").getroot().iter("testcase")}
    failure = cases["test_fails_with_its_message"].find("failure")
    assert failure is not None and "the-failure-message-from-the-guest" in (failure.get("message") or "")


def test_worker_vms_refuse_what_they_cannot_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--microvm-workers", "2", "-n", "2", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--microvm-workers N starts N workers of its own: drop -n / --tx*"])
