"""Snapshot clones beside boots, in one run: one table of medians and ratios.

    .venv/bin/python bench/snapshot.py [--runs 7] [--tests 50] [--kernel debian|source]

1. ready: a clone (template cached) vs a boot of the same image, from the call to a
   passed probe; runs interleave (boot, clone, boot, clone, …) so machine load hits both
   alike. Goal: clone ≤ 0.15x boot (Debian's kernel), ≤ 0.25x (the source kernel).
2. a command in a fresh VM: `microvm run -- true` (a clone) vs virtme-ng
   (`vng --run <same kernel> --disable-kvm --force-9p --exec true`, see bench/peers.py)
   and vs `microvm run --snapshot off -- true`. Goal: ≤ 0.125x virtme-ng.
3. a 50-test suite, a fresh VM per test (the `microvm` fixture): pytest wall time with
   clones (the default) vs `--microvm-snapshot off`. Goal: ≥ 5x faster.
4. what a clone costs the host: its RAM on tmpfs (only the pages the template's guest
   touched are copied), QEMU's resident memory, and the template on disk.

The template is made (or found in the cache) before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import PeerRun, say, timed, vng_measure, vng_setup

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm.machine import choose, detect_host
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.snapshot.strategies import RestoreClone

GOALS = {"debian": 0.15, "source": 0.25}


def ready_times(image: GuestImage, runs: int) -> tuple[list[float], list[float], list[float]]:
    """(boot-to-ready, clone-to-ready, the clones' restore part), interleaved."""
    templates = Templates()
    config = VMConfig(image=image)
    warm = templates.start(config, name="warm")  # makes or finds the template
    assert warm.cloned, "this configuration does not clone here: nothing to measure"
    warm.stop()
    boots: list[float] = []
    clones: list[float] = []
    restores: list[float] = []
    for i in range(runs):
        start = time.monotonic()
        vm = MicroVM(config).start()
        boots.append(time.monotonic() - start)
        vm.stop()
        start = time.monotonic()
        clone = templates.start(config, name="clone")
        clones.append(time.monotonic() - start)
        assert isinstance(clone.launch, RestoreClone) and clone.launch.restore_seconds is not None
        restores.append(clone.launch.restore_seconds)
        clone.stop()
        say(f"ready {i + 1}/{runs}: boot {boots[-1]:.2f}s, clone {clones[-1]:.2f}s")
    return boots, clones, restores


def fresh_vm_command(image: GuestImage, kernel: str, runs: int) -> tuple[list[str], list[str]]:
    run = [sys.executable, "-m", "pytest_microvm.cli", "run", "--kernel", kernel]
    vng_argv, why = vng_setup(image, install=False)
    ours: list[float] = []
    booted: list[float] = []
    theirs: list[float] = []
    failed: list[PeerRun] = []
    for i in range(runs):
        t, proc = timed([*run, "--", "true"])
        assert proc.returncode == 0, proc.stderr
        ours.append(t)
        t, proc = timed([*run, "--snapshot", "off", "--", "true"])
        assert proc.returncode == 0, proc.stderr
        booted.append(t)
        line = f"fresh VM {i + 1}/{runs}: microvm run {ours[-1]:.2f}s, --snapshot off {booted[-1]:.2f}s"
        if vng_argv is not None:
            line += vng_measure(vng_argv, f"fresh VM {i + 1}/{runs}", theirs, failed)
        say(line)
    mo, mb = statistics.median(ours), statistics.median(booted)
    rows = [f"`microvm run -- true` (s)     {mo:9.2f} {mb:11.2f} {mo / mb:8.3f}x   vs --snapshot off (a boot)"]
    if theirs:
        mt = statistics.median(theirs)
        rows.append(
            f"`microvm run -- true` (s)     {mo:9.2f} {mt:11.2f} {mo / mt:8.3f}x   vs virtme-ng (goal ≤ 0.125x)"
        )
    else:
        rows.append(f"`microvm run -- true` (s)     {mo:9.2f} {'-':>11} {'-':>9}   virtme-ng: {why}")
    notes = [f"note: virtme-ng try failed: {r.why}" for r in failed]
    return rows, notes


SUITE = """
def test_fresh_vm_{i}(microvm):
    assert microvm.run(["true"]).exit_code == 0
"""


def suite_times(kernel: str, tests: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="microvm-suite-") as tmp:
        Path(tmp, "test_suite.py").write_text("".join(SUITE.format(i=i) for i in range(tests)))
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        base += [f"--microvm-kernel={kernel}", "--rootdir", tmp, tmp]
        times = {}
        for mode in ("auto", "off"):
            start = time.monotonic()
            proc = subprocess.run([*base, f"--microvm-snapshot={mode}"], capture_output=True, cwd=tmp, timeout=3600)
            times[mode] = time.monotonic() - start
            assert proc.returncode == 0, proc.stdout.decode()[-3000:]
            say(f"{tests}-test suite, snapshot {mode}: {times[mode]:.1f}s")
    speedup = times["off"] / times["auto"]
    return [
        f"{tests}-test suite, VM per test (s){times['auto']:6.1f} {times['off']:11.1f} {speedup:8.1f}x   "
        "faster with clones (goal ≥ 5x)"
    ]


def _kib(status: dict[str, str], field: str) -> int:
    return int(status[field].split()[0])


def clone_cost(image: GuestImage) -> list[str]:
    templates = Templates()
    config = VMConfig(image=image)
    clone = templates.start(config, name="cost")
    boot = MicroVM(config).start()
    try:
        assert isinstance(clone.launch, RestoreClone)
        rows = []
        for what, vm in (("clone", clone), ("boot", boot)):
            vm.run(["true"])
            assert vm.qemu is not None and vm.qemu.pid is not None
            pid = vm.qemu.pid
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            ram = _guest_ram_bytes(pid)
            anon, files, shared = (_kib(status, f) / 1024 for f in ("RssAnon", "RssFile", "RssShmem"))
            rows.append(
                f"{what}: QEMU RSS anon {anon:.1f} MiB, file {files:.1f} MiB, shared (guest RAM) {shared:.1f} MiB; "
                f"guest RAM file allocated {ram / (1 << 20):.1f} MiB of {config.memory_mib} MiB"
            )
        template = clone.launch.template
        on_disk = sum(p.stat().st_blocks * 512 for p in template.directory.iterdir())
        rows.append(
            f"template on disk: {on_disk / (1 << 20):.1f} MiB allocated (RAM {template.ram.stat().st_size >> 20} MiB "
            f"sparse, device state {template.state.stat().st_size / 1024:.0f} KiB)"
        )
        return rows
    finally:
        clone.stop()
        boot.stop()


def _guest_ram_bytes(pid: int) -> int:
    """Allocated bytes of the file behind guest RAM (a memfd, or a tmpfs file): what the
    guest's memory costs the host. The largest such file QEMU holds is the RAM."""
    sizes = [0]
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(("/memfd:", "/dev/shm/")):
                sizes.append(os.stat(fd).st_blocks * 512)
        except OSError:
            continue
    return max(sizes)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tests", type=int, default=50, help="tests in the suite row (0: skip it)")
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"], help="the image's kernel")
    args = ap.parse_args()
    image, host = build_image(kernel=args.kernel), detect_host()
    boots, clones, restores = ready_times(image, args.runs)
    mb, mc = statistics.median(boots), statistics.median(clones)
    rows = [
        f"ready: clone vs boot (s)      {mc:9.2f} {mb:11.2f} {mc / mb:8.3f}x   goal ≤ {GOALS[args.kernel]}x "
        f"(restore part {statistics.median(restores):.3f}s)"
    ]
    command_rows, notes = fresh_vm_command(image, args.kernel, max(3, args.runs // 2))
    rows += command_rows
    if args.tests:
        rows += suite_times(args.kernel, args.tests)
    cost = clone_cost(image)
    print(f"path: {choose(host).why}; QEMU {host.qemu_version}; kernel {image.kernel_release} ({args.kernel}); "
          f"{os.cpu_count()} cores; medians of {args.runs}")  # fmt: skip
    print(f"{'':30}{'clone':>9} {'other':>11} {'ratio':>9}")
    for row in rows:
        print(row)
    for line in cost + notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
