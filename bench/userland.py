"""What the guest's own userland costs, side by side in one run: one table of medians and ratios.

    .venv/bin/python bench/userland.py [--runs 5] [--kernel debian|source]

1. building a ``packages=("python3",)`` image: cold (apt's index warm, nothing of the
   root in the cache: a scratch cache that already holds the kernel and agent), and a
   cached lookup of the same image (goals: ≤ 15 s and ≤ 50 ms)
2. boot-to-ready of the python3 EROFS image vs the busybox image, same kernel (goal ≤ 1.3x)
3. the first ``python3 -c pass`` in a fresh guest of the python3 image (goal ≤ 1.0 s under TCG)
4. host-userland mode, a command in a fresh VM: ``microvm run --rootfs host -- true`` vs
   ``vng --run <same kernel> --force-9p --exec …`` (goal ≤ 0.25x); a virtme-ng run is
   judged by its output, as in bench/peers.py (it exits 255 here even when it ran)
5. reading a 64 MiB file from a share vs ``vm.get_file`` of the same file, same VM

Runs of compared rows interleave (a, b, a, b, …) so machine load hits both alike. The
header says which accelerator and vsock flavour ran.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from peers import say, timed, vng_once, vng_setup, with_one_retry  # noqa: E402

from pytest_microvm import MicroVM, Share, VMConfig, build_image  # noqa: E402
from pytest_microvm.cache import cache_dir  # noqa: E402
from pytest_microvm.machine import choose, detect_host  # noqa: E402

MIB = 1 << 20
PACKAGES = ("python3",)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def row(name: str, ours: float, theirs: float, verdict: str) -> str:
    return f"{name:<44} {ours:10.3f} {theirs:10.3f} {ours / theirs:8.2f}x  {verdict}"


def build_times(kernel: str, runs: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch:
        # The kernel and agent come from the real cache (copies: not what this row times).
        src = cache_dir()
        for part in ("kernels", "agent", "busybox", "apt"):
            if (src / part).is_dir():
                shutil.copytree(src / part, Path(scratch) / part, symlinks=True, ignore_dangling_symlinks=True)
        build_image(kernel=kernel, cache=scratch)  # the busybox image: the same kernel, untimed
        start = time.monotonic()
        image = build_image(kernel=kernel, cache=scratch, packages=PACKAGES, progress=say)
        cold = time.monotonic() - start
        warm = []
        for _ in range(max(5, runs)):
            start = time.monotonic()
            build_image(kernel=kernel, cache=scratch, packages=PACKAGES)
            warm.append(time.monotonic() - start)
        size = image.root_disk.stat().st_size / 1e6 if image.root_disk else 0.0
    return [
        f"{'cold build, packages=python3 (s)':<44} {cold:10.2f} {'':>10} {'':>9}  goal <= 15 s; root {size:.1f} MB",
        f"{'cached lookup of that image (ms)':<44} {median(warm) * 1000:10.1f} {'':>10} {'':>9}  goal <= 50 ms",
    ]


def boot_and_python(kernel: str, runs: int) -> list[str]:
    busybox = build_image(kernel=kernel)
    python = build_image(kernel=kernel, packages=PACKAGES)
    ready_bb, ready_py, first_py = [], [], []
    for i in range(runs):
        with MicroVM(VMConfig(image=busybox)) as vm:
            assert vm.ready_seconds is not None
            ready_bb.append(vm.ready_seconds)
        with MicroVM(VMConfig(image=python, packages=PACKAGES)) as vm:
            assert vm.ready_seconds is not None
            ready_py.append(vm.ready_seconds)
            start = time.monotonic()
            vm.run(["python3", "-c", "pass"], check=True, timeout=120)
            first_py.append(time.monotonic() - start)
        say(f"boot {i + 1}/{runs}: busybox {ready_bb[-1]:.2f}s, python3 {ready_py[-1]:.2f}s, first python3 "
            f"{first_py[-1]:.2f}s")  # fmt: skip
    ratio = median(ready_py) / median(ready_bb)
    return [
        row("boot to ready (s): python3 EROFS / busybox", median(ready_py), median(ready_bb),
            "goal <= 1.3x: " + ("met" if ratio <= 1.3 else "not met")),
        f"{'first python3 -c pass in a fresh guest (s)':<44} {median(first_py):10.3f} {'':>10} {'':>9}  "
        f"goal <= 1.0 s: {'met' if median(first_py) <= 1.0 else 'not met'}",
    ]  # fmt: skip


def host_mode_vs_vng(kernel: str, runs: int) -> tuple[list[str], list[str]]:
    image = build_image(kernel=kernel)
    vng_argv, why = vng_setup(image, install=False)
    ours_argv = [
        sys.executable,
        "-m",
        "pytest_microvm.cli",
        "run",
        "--kernel",
        kernel,
        "--rootfs",
        "host",
        "--",
        "true",
    ]
    ours, theirs, failed = [], [], []
    for i in range(runs):
        t, proc = timed(ours_argv)
        assert proc.returncode == 0, proc.stderr
        ours.append(t)
        if vng_argv is not None:
            seconds, failures = with_one_retry(functools.partial(vng_once, vng_argv))
            failed += failures
            if seconds is not None:
                theirs.append(seconds)
        say(
            f"host mode {i + 1}/{runs}: microvm run --rootfs host {t:.2f}s"
            + (f", vng {theirs[-1]:.2f}s" if theirs else "")
        )
    notes = [f"note: virtme-ng try failed: {run.why}" for run in failed]
    if not theirs:
        return [
            f"{'host mode, command in a fresh VM (s)':<44} {median(ours):10.3f} {'-':>10} {'-':>9}  virtme-ng: {why}"
        ], notes
    r = median(ours) / median(theirs)
    fails = f"; virtme-ng failed {len(failed)} tries (retried once each)" if failed else ""
    return [row("host mode vs vng, command in a fresh VM (s)", median(ours), median(theirs),
                "goal <= 0.25x: " + ("met" if r <= 0.25 else "not met") + fails)], notes  # fmt: skip


def share_vs_get_file(kernel: str, runs: int) -> list[str]:
    image = build_image(kernel=kernel)
    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir()
        (shared / "blob").write_bytes(os.urandom(64 * MIB))
        out = Path(tmp) / "copy"
        with MicroVM(VMConfig(image=image, shares={"/mnt/s": Share(shared, readonly=True)})) as vm:
            vm.run("cp /mnt/s/blob /tmp/blob", check=True, timeout=300)  # the get_file source, in guest RAM
            share, get = [], []
            for _ in range(runs):
                start = time.monotonic()
                vm.run("cat /mnt/s/blob >/dev/null", check=True, timeout=300)
                share.append(time.monotonic() - start)
                start = time.monotonic()
                vm.get_file("/tmp/blob", out)
                get.append(time.monotonic() - start)
    mb = 64 * MIB / 1e6
    return [
        f"{'64 MiB: guest reads share / get_file (MB/s)':<44} {mb / median(share):10.1f} {mb / median(get):10.1f} "
        f"{median(get) / median(share):8.2f}x  (share read in the guest; get_file to the host)"
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"])
    ap.add_argument("--only", choices=["build", "boot", "host", "share"], action="append")
    args = ap.parse_args()
    choice = choose(detect_host(), "auto", "auto")
    lines: list[str] = []
    notes: list[str] = []
    only = set(args.only or ["build", "boot", "host", "share"])
    if "build" in only:
        lines += build_times(args.kernel, args.runs)
    if "boot" in only:
        lines += boot_and_python(args.kernel, args.runs)
    if "host" in only:
        rows, more = host_mode_vs_vng(args.kernel, args.runs)
        lines += rows
        notes += more
    if "share" in only:
        lines += share_vs_get_file(args.kernel, args.runs)
    print(f"\nuserland benchmark: kernel {args.kernel}, accel {choice.accel}, vsock {choice.vsock} "
          f"({choice.why}); medians of {args.runs}")  # fmt: skip
    print(f"{'':<44} {'ours':>10} {'other':>10} {'ratio':>9}")
    for line in lines:
        print(line)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
