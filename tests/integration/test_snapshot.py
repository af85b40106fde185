"""Snapshot templates and clones with real QEMU guests, on both vsock paths (the userspace
backend here; kernel vhost-vsock inside scripts/nested): clones are ready, independent and
each their own (clock, RNG, token, vmgenid), the template's RAM stays as it was saved, and
every way a template or a restore can fail ends in a working VM with a warning that says why."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from pytest_microvm import ConnectionLost, GuestImage, MicroVM, MicroVMError, VMConfig
from pytest_microvm.channel import kernel
from pytest_microvm.channel.backends import fork_server
from pytest_microvm.machine import HostReport, launch
from pytest_microvm.machine.launch import LaunchContext
from pytest_microvm.machine.pool import ClonePool
from pytest_microvm.machine.snapshot.key import template_key
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.snapshot.store import Template, templates_dir
from pytest_microvm.machine.snapshot.strategies import HOTPLUG_PORT, VSOCK_ID, PluggedVsock, RestoreClone
from tests.agent_harness import processes_mentioning, reaping
from tests.integration.paths import needs_kernel_path, path_params


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


def _restore(vm: MicroVM) -> RestoreClone:
    """The clone's launch: which template, which vmgenid."""
    assert vm.cloned and isinstance(vm.launch, RestoreClone), f"{vm.name} booted instead of cloning"
    return vm.launch


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _shm() -> set[str]:
    """What /dev/shm holds (a guest running these tests, scripts/nested's, may have none)."""
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


# 50 on the userspace path; 20 on the kernel path, whose clones run as guests inside a TCG guest.
@pytest.mark.parametrize(
    ("path", "count"),
    [pytest.param(p.values[0], 50 if p.id == "userspace" else 20, id=p.id, marks=p.marks) for p in path_params()],
)
def test_clones_in_a_row_are_fresh_and_their_own(templates: Templates, config: VMConfig, path: str, count: int) -> None:
    workroot = Path(tempfile.mkdtemp(prefix="row-", dir="/tmp"))  # every VM's argv names it
    config = config.with_(vsock=path, workdir=workroot)
    shm_before = _shm()
    pool = ClonePool(templates, size=1)
    seen: dict[str, set[str]] = {"uuid": set(), "token": set(), "vmgenid": set(), "random": set(), "cid": set()}
    template: Template | None = None
    try:
        for i in range(count):
            vm = pool.take(config, name=f"clone{i}")
            try:
                template = _restore(vm).template
                if i == 0:
                    saved = _digest(template.ram)
                # What the previous clone wrote is not here: each starts from the template.
                assert _guest(vm, "ls /tmp; test ! -e /tmp/written-by-a-clone && echo fresh").endswith("fresh")
                _guest(vm, f"echo {i} > /tmp/written-by-a-clone")
                seen["uuid"].add(_guest(vm, "cat /proc/sys/kernel/random/uuid"))
                seen["random"].add(_guest(vm, "head -c 16 /dev/urandom | od -An -tx1"))
                seen["token"].add(vm.token)
                seen["vmgenid"].add(_generation_id(vm))
                assert vm.channel is not None
                seen["cid"].add(str(vm.channel.guest_cid))
                before = time.time()
                guest = int(_guest(vm, "date +%s"))  # busybox date: whole seconds
                assert int(before) - 1 <= guest <= time.time() + 1, "the clone's clock is not the host's"
            finally:
                vm.stop()
    finally:
        pool.close()
        shutil.rmtree(workroot, ignore_errors=True)
    unique = {name: len(values) for name, values in seen.items()}
    # Each clone is its own; on the userspace path every VM has its own CID space (guest CID 3).
    assert unique == {**dict.fromkeys(seen, count), "cid": count if path == "kernel" else 1}
    # The clones ran on the template's RAM (copied, or mapped copy-on-write): it is as saved.
    assert template is not None and _digest(template.ram) == saved
    assert processes_mentioning(str(workroot)) == {}
    assert _shm() - shm_before == set()  # no RAM file left


def test_two_clones_differ_in_what_makes_them_unique(templates: Templates, config: VMConfig) -> None:
    a = templates.start(config, name="a")
    b = templates.start(config, name="b")
    try:
        ra, rb = _restore(a), _restore(b)
        assert ra.template == rb.template
        # The same memory was restored twice; the kernel's RNG and UUIDs must still differ.
        for command in ("cat /proc/sys/kernel/random/uuid", "head -c 32 /dev/urandom | od -An -tx1"):
            assert _guest(a, command) != _guest(b, command)
        assert a.token != b.token and a.token != ra.template.token
        assert _generation_id(a) == ra.vmgenid and _generation_id(b) == rb.vmgenid and ra.vmgenid != rb.vmgenid
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
        assert vm.cloned
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
        assert vm.cloned
        assert _guest(vm, "cat /mnt/src/hello.txt") == "from the host"
        _guest(vm, "echo back > /mnt/src/from-guest.txt")
        assert (tmp_path / "from-guest.txt").read_text() == "back\n"
    finally:
        vm.stop()


def test_snapshot_false_boots(templates: Templates, config: VMConfig) -> None:
    vm = templates.start(config.with_(snapshot=False), name="booted")
    try:
        assert not vm.cloned and vm.run(["true"]).exit_code == 0
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
        assert vm.cloned
        vm.stop()
    assert len([d for d in templates_dir(tmp_path).iterdir() if d.is_dir()]) == 2


@needs_kernel_path
def test_a_clone_whose_cid_is_taken_retries_with_another(
    templates: Templates, config: VMConfig, host: HostReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config.with_(vsock="kernel")
    templates.start(config, name="first").stop()  # the template exists: what follows is a clone's start
    # A guest CID held by a VM that is not ours: our lock files cannot know it, QEMU says so.
    taken = random.randint(*kernel.AGENT_CIDS)
    assert host.qemu is not None
    squatter = subprocess.Popen(
        [host.qemu, "-M", "q35", "-nodefaults", "-display", "none", "-S",
         "-device", f"vhost-vsock-pci,guest-cid={taken}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "/dev/vhost-vsock" not in _open_files(squatter.pid):  # it holds the CID from here on
            assert squatter.poll() is None and time.monotonic() < deadline, squatter.stderr
            time.sleep(0.05)
        drawn = iter([taken])

        class Scripted(random.Random):
            def randint(self, a: int, b: int) -> int:
                return next(drawn, None) or super().randint(a, b)

        monkeypatch.setattr(kernel, "_rng", Scripted())
        vm = templates.start(config, name="retried")
        try:
            assert vm.cloned and vm.channel is not None
            assert vm.channel.guest_cid != taken and next(drawn, None) is None  # it drew the taken one first
            assert vm.run(["true"]).exit_code == 0
        finally:
            vm.stop()
    finally:
        squatter.kill()
        squatter.communicate()


def _open_files(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


# Each damage on the userspace path; one on the kernel path, where each template is a boot
# of a guest inside a TCG guest.
@pytest.mark.parametrize(
    ("path", "damage"),
    [
        *[pytest.param("userspace", damage, id=f"userspace-{damage}") for damage in ("truncated", "garbage")],
        *[pytest.param("kernel", "garbage", id="kernel-garbage", marks=p.marks) for p in path_params()[1:]],
    ],
)
def test_a_corrupt_state_file_is_discarded_and_remade(
    config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, path: str
) -> None:
    config = config.with_(vsock=path)
    templates = Templates(tmp_path)
    templates.start(config, name="first").stop()
    (state,) = templates_dir(tmp_path).glob("*/state")
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    with caplog.at_level(logging.WARNING, logger="pytest_microvm"):
        vm = templates.start(config, name="after")
    try:
        assert vm.cloned, "the remade template should restore"
        assert vm.run(["true"]).exit_code == 0
        assert "making it again" in caplog.text
        assert state.read_bytes() != data[: len(data) // 3] and state.stat().st_size > 0
    finally:
        vm.stop()


class RefusedHotplug(PluggedVsock):
    """A hot-plug QEMU refuses (a driver that does not exist): stands for any restore fault."""

    def after_restore(self, ctx: LaunchContext) -> None:
        ctx.monitor.device_add("no-such-vsock-device", VSOCK_ID, bus=HOTPLUG_PORT)


def test_a_restore_that_fails_twice_boots_with_a_warning(
    config: VMConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def restore(config: VMConfig, template: Template, host: HostReport, name: str) -> MicroVM:
        clone = RestoreClone(template, vsock=RefusedHotplug())
        return launch.start(lambda: MicroVM(config, host=host, name=name, launch=clone))

    templates = Templates(tmp_path, restore=restore)
    with caplog.at_level(logging.WARNING, logger="pytest_microvm"):
        vm = templates.start(config, name="fallback")
        vm.stop()
        again = templates.start(config, name="fallback2")  # no third try: boots at once
        again.stop()
    assert not vm.cloned and not again.cloned
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
        assert not vm.cloned
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
        from pytest_microvm.machine.snapshot.key import template_key
        from pytest_microvm.machine.snapshot.store import make_template
        from pytest_microvm.machine.snapshot.strategies import save_template
        image = GuestImage.load(Path({str(config.image.directory)!r}))
        config = VMConfig(image=image)
        host = detect_host()
        key = template_key(config, image, host)
        save = lambda staging: save_template(config, image, host, staging)
        t = make_template(key, config.memory_mib, save, Path({str(tmp_path)!r}))
        print("TEMPLATE", t.directory, t.token)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    with reaping(*procs):
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = {line for out in outputs for line in out.splitlines() if line.startswith("TEMPLATE")}
    assert len(results) == 1, outputs  # both got the same template (same directory, same token)
    assert sum(out.count("made snapshot template") for out in outputs) == 1, outputs


# ---- nothing left behind ------------------------------------------------------------------


PLUGIN_SUITE = """
import pytest

def test_fixture_is_a_clone(microvm):
    assert microvm.cloned

@pytest.mark.microvm(snapshot=False)
def test_marker_boots(microvm):
    assert not microvm.cloned

def test_factory_clones(microvm_factory):
    a, b = microvm_factory(), microvm_factory()
    assert a.cloned and b.cloned and a.token != b.token

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
    shm_before = _shm()
    try:
        result = pytester.runpytest_subprocess(*inner_options, timeout=600)
        # The pool made one more clone ahead than the session used: gone with the session,
        # as is everything else (processes, RAM files).
        assert processes_mentioning(str(workroot)) == {}
        assert _shm() - shm_before == set()
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
    shm_before = _shm()
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
        assert _shm() - shm_before == set()  # clone RAM has no name to leave
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workroot, ignore_errors=True)


# ---- the fork server: one per process, serving every userspace-path VM ---------------------


def test_clones_whose_fork_server_is_killed_fail_clearly_and_later_ones_get_a_new_one(
    templates: Templates, config: VMConfig
) -> None:
    workroot = Path(tempfile.mkdtemp(prefix="forkserver-", dir="/tmp"))
    config = config.with_(vsock="userspace", workdir=workroot)
    vms: list[MicroVM] = []
    try:
        vms = [templates.start(config, name=f"served{i}") for i in range(4)]
        assert all(vm.cloned for vm in vms)
        running = [vm.start_process(["sleep", "60"]) for vm in vms]
        server = fork_server().pid
        assert server is not None
        os.kill(server, signal.SIGKILL)  # every backend it forked ends with it (PR_SET_PDEATHSIG)
        for vm, process in zip(vms, running, strict=True):
            with pytest.raises(ConnectionLost):
                process.wait(timeout=30)
            with pytest.raises(MicroVMError, match=r"vsock backend .* ended with the fork server .* signal 9"):
                vm.run(["true"], timeout=30)
        with templates.start(config, name="later") as later:  # a new server forks its backend
            assert later.cloned and later.run(["echo", "served"]).stdout == b"served\n"
            assert fork_server().pid not in (None, server)
    finally:
        for vm in vms:
            vm.stop()
        shutil.rmtree(workroot, ignore_errors=True)
    assert processes_mentioning(str(workroot)) == {}
