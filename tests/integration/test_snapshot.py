"""Snapshot templates and clones with real QEMU guests (TCG + the userspace vsock here):
clones are ready, independent and each their own (clock, RNG, token, vmgenid), and every
way a template or a restore can fail ends in a working VM with a warning that says why."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pytest_microvm import GuestImage, MicroVM, VMConfig
from pytest_microvm.machine import HostReport
from pytest_microvm.machine.pool import ClonePool
from pytest_microvm.machine.snapshot import (
    CloneVM,
    Templates,
    template_key,
    templates_dir,
)
from tests.agent_harness import processes_mentioning


@pytest.fixture(scope="module")
def templates() -> Templates:
    """The shared cache's templates: made once for this image, reused by every session."""
    return Templates()


@pytest.fixture
def config(microvm_image: GuestImage) -> VMConfig:
    return VMConfig(image=microvm_image)


def _guest(vm: MicroVM, command: str) -> str:
    return vm.run(["sh", "-c", command], check=True).stdout.decode().strip()


def _generation_id(vm: MicroVM) -> str:
    assert vm.monitor is not None
    return str(vm.monitor.command("query-vm-generation-id")["return"]["guid"])


def test_fifty_clones_in_a_row_are_ready_and_independent(templates: Templates, config: VMConfig) -> None:
    pool = ClonePool(templates, size=1)
    seen: dict[str, set[str]] = {"uuid": set(), "token": set(), "vmgenid": set(), "random": set()}
    try:
        for i in range(50):
            vm = pool.take(config, name=f"clone{i}")
            try:
                assert isinstance(vm, CloneVM), f"clone {i} booted instead"
                # What the previous clone wrote is not here: each starts from the template.
                assert _guest(vm, "ls /tmp; test ! -e /tmp/written-by-a-clone && echo fresh").endswith("fresh")
                _guest(vm, f"echo {i} > /tmp/written-by-a-clone")
                seen["uuid"].add(_guest(vm, "cat /proc/sys/kernel/random/uuid"))
                seen["random"].add(_guest(vm, "head -c 16 /dev/urandom | od -An -tx1"))
                seen["token"].add(vm.token)
                seen["vmgenid"].add(_generation_id(vm))
            finally:
                vm.stop()
    finally:
        pool.close()
    assert {name: len(values) for name, values in seen.items()} == dict.fromkeys(seen, 50)


def test_two_clones_differ_in_what_makes_them_unique(templates: Templates, config: VMConfig) -> None:
    a = templates.start(config, name="a")
    b = templates.start(config, name="b")
    try:
        assert isinstance(a, CloneVM) and isinstance(b, CloneVM) and a.template == b.template
        # The same memory was restored twice; the kernel's RNG and UUIDs must still differ.
        for command in ("cat /proc/sys/kernel/random/uuid", "head -c 32 /dev/urandom | od -An -tx1"):
            assert _guest(a, command) != _guest(b, command)
        assert a.token != b.token and a.token != a.template.token
        assert _generation_id(a) == a.vmgenid and _generation_id(b) == b.vmgenid and a.vmgenid != b.vmgenid
        # The guest kernel has the vmgenid driver bound, so its software hears of the change.
        assert _guest(a, "ls /sys/bus/acpi/drivers/vmgenid/ | grep -c QEMUVGID") == "1"
    finally:
        a.stop()
        b.stop()


def test_a_clone_keeps_no_stale_clock(config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    templates = Templates(tmp_path / "cache")
    first = templates.start(config, name="first")  # makes the template now
    first.stop()
    time.sleep(3)  # the template's saved clock is now 3 s behind
    vm = templates.start(config, name="clone")
    try:
        assert isinstance(vm, CloneVM)
        before = time.time()
        guest = int(_guest(vm, "date +%s"))  # busybox date: whole seconds
        after = time.time()
        assert int(before) - 1 <= guest <= after + 1, (before, guest, after)
    finally:
        vm.stop()


def test_shares_are_mounted_after_the_restore(templates: Templates, config: VMConfig, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("from the host\n")
    vm = templates.start(config.with_(shares={"/mnt/src": tmp_path}), name="shared")
    try:
        assert isinstance(vm, CloneVM)
        assert _guest(vm, "cat /mnt/src/hello.txt") == "from the host"
        _guest(vm, "echo back > /mnt/src/from-guest.txt")
        assert (tmp_path / "from-guest.txt").read_text() == "back\n"
    finally:
        vm.stop()


def test_snapshot_false_boots(templates: Templates, config: VMConfig) -> None:
    vm = templates.start(config.with_(snapshot=False), name="booted")
    try:
        assert type(vm) is MicroVM and vm.run(["true"]).exit_code == 0
    finally:
        vm.stop()


# ---- faults -------------------------------------------------------------------------------


def test_a_new_qemu_version_makes_a_new_template(
    config: VMConfig, host: HostReport, microvm_image: GuestImage, tmp_path: Path
) -> None:
    upgraded = dataclasses.replace(host, qemu_version=f"{host.qemu_version}+upgraded")
    assert template_key(config, microvm_image, upgraded) != template_key(config, microvm_image, host)
    templates = Templates(tmp_path)
    for report in (host, upgraded):
        vm = templates.start(config, host=report, name="v")
        assert isinstance(vm, CloneVM)
        vm.stop()
    assert len([d for d in templates_dir(tmp_path).iterdir() if d.is_dir()]) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_state_file_is_discarded_and_remade(
    config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    templates = Templates(tmp_path)
    templates.start(config, name="first").stop()
    (state,) = templates_dir(tmp_path).glob("*/state")
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    with caplog.at_level(logging.WARNING, logger="pytest_microvm"):
        vm = templates.start(config, name="after")
    try:
        assert isinstance(vm, CloneVM), "the remade template should restore"
        assert vm.run(["true"]).exit_code == 0
        assert "making it again" in caplog.text
        assert state.read_bytes() != data[: len(data) // 3] and state.stat().st_size > 0
    finally:
        vm.stop()


def test_a_restore_that_fails_twice_boots_with_a_warning(
    config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hot-plug QEMU refuses (a driver that does not exist) stands for any restore fault.
    real_layout = CloneVM._layout

    def broken_layout(self: CloneVM, device: tuple[str, dict[str, str]]) -> object:
        return real_layout(self, ("no-such-vsock-device", device[1]))

    monkeypatch.setattr(CloneVM, "_layout", broken_layout)
    templates = Templates(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pytest_microvm"):
        vm = templates.start(config, name="fallback")
        vm.stop()
        again = templates.start(config, name="fallback2")  # no third try: boots at once
        again.stop()
    assert type(vm) is MicroVM and type(again) is MicroVM
    warnings = [r.getMessage() for r in caplog.records if "booting instead of cloning" in r.getMessage()]
    assert len(warnings) == 1 and "failed twice" in warnings[0] and "no-such-vsock-device" in warnings[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs for clone RAM")
def test_a_small_shm_boots_with_a_warning_naming_the_size(
    config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small-shm"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("MICROVM_SHM_DIR", str(small))
        with caplog.at_level(logging.WARNING, logger="pytest_microvm"):
            vm = Templates().start(config, name="small")
        vm.stop()
        assert type(vm) is MicroVM
        assert f"a clone needs {config.memory_mib} MiB" in caplog.text and str(small) in caplog.text
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_two_processes_make_one_template(config: VMConfig, tmp_path: Path, host: HostReport) -> None:
    assert config.image is not None
    script = textwrap.dedent(
        f"""
        import logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from pytest_microvm import VMConfig
        from pytest_microvm.image import GuestImage
        from pytest_microvm.machine import detect_host
        from pytest_microvm.machine.snapshot import make_template, template_key
        image = GuestImage.load(Path({str(config.image.directory)!r}))
        config = VMConfig(image=image)
        host = detect_host()
        t = make_template(config, image, host, template_key(config, image, host), Path({str(tmp_path)!r}))
        print("TEMPLATE", t.directory, t.token)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = {line for out in outputs for line in out.splitlines() if line.startswith("TEMPLATE")}
    assert len(results) == 1, outputs  # both got the same template (same directory, same token)
    assert sum(out.count("made snapshot template") for out in outputs) == 1, outputs


# ---- nothing left behind ------------------------------------------------------------------


PLUGIN_SUITE = """
import pytest
from pytest_microvm.machine.snapshot import CloneVM

def test_fixture_is_a_clone(microvm):
    assert isinstance(microvm, CloneVM)

@pytest.mark.microvm(snapshot=False)
def test_marker_boots(microvm):
    assert not isinstance(microvm, CloneVM)

def test_factory_clones(microvm_factory):
    a, b = microvm_factory(), microvm_factory()
    assert isinstance(a, CloneVM) and isinstance(b, CloneVM) and a.token != b.token

def test_module_vm_first(microvm_module):
    microvm_module.run("echo kept > /tmp/kept")

def test_module_vm_second(microvm_module):
    assert microvm_module.read_file("/tmp/kept") == b"kept\\n"
"""


@pytest.fixture
def inner_options(microvm_image: GuestImage, session_kernel: str | None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A pytester session on this session's image cache and kernel (nothing rebuilt)."""
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(microvm_image.directory.parents[1]))
    return ["-p", "no:cacheprovider", *([f"--microvm-kernel={session_kernel}"] if session_kernel else [])]


def test_the_plugin_hands_out_clones(
    pytester: pytest.Pytester, inner_options: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_suite=PLUGIN_SUITE)
    workroot = Path(tempfile.mkdtemp(prefix="clones-", dir="/tmp"))  # every VM's argv names it
    monkeypatch.setenv("TMPDIR", str(workroot))
    shm_before = set(os.listdir("/dev/shm"))
    try:
        result = pytester.runpytest_subprocess(*inner_options, timeout=600)
        # The pool made one more clone ahead than the session used: gone with the session,
        # as is everything else (processes, RAM files).
        assert processes_mentioning(str(workroot)) == {}
        assert set(os.listdir("/dev/shm")) - shm_before == set()
    finally:
        monkeypatch.delenv("TMPDIR")
        shutil.rmtree(workroot, ignore_errors=True)
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["microvm: fresh VMs are snapshot clones where possible, 1 made ahead"])
    off = pytester.runpytest_subprocess(*inner_options, "--microvm-snapshot", "off", timeout=600)
    off.assert_outcomes(passed=3, failed=2)  # the two that expect clones
    off.stdout.fnmatch_lines(["microvm: snapshots off: every VM boots"])


def test_killing_pytest_while_the_pool_holds_clones_leaves_nothing(
    pytester: pytest.Pytester, inner_options: list[str]
) -> None:
    marker = pytester.path / "started"
    pytester.makepyfile(
        f"""
        import time
        from pathlib import Path

        def test_one(microvm):
            assert microvm.run(["true"]).exit_code == 0

        def test_two(microvm):
            Path({str(marker)!r}).write_text("x")
            time.sleep(600)
        """
    )
    shm_before = set(os.listdir("/dev/shm"))
    workroot = Path(tempfile.mkdtemp(prefix="kill-", dir="/tmp"))  # every VM's argv names it
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", *inner_options],
        cwd=pytester.path,
        env={**os.environ, "TMPDIR": str(workroot)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the inner test never started"
            time.sleep(0.2)
        # The test holds one clone and the pool makes the next: wait until both run.
        while sum("qemu-system" in c for c in processes_mentioning(str(workroot)).values()) < 2:
            assert time.monotonic() < deadline, processes_mentioning(str(workroot))
            time.sleep(0.1)
        proc.kill()  # SIGKILL: no teardown, no atexit
        proc.wait()
        deadline = time.monotonic() + 10
        while processes_mentioning(str(workroot)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(workroot)) == {}
        assert set(os.listdir("/dev/shm")) - shm_before == set()  # clone RAM has no name to leave
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workroot, ignore_errors=True)
