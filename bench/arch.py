"""Guests of two architectures side by side, in one run: medians and the ratio.

    .venv/bin/python bench/arch.py [--runs 7] [--execs 50] [--kernel debian|source] [--kernels]

Each row runs the host's own architecture and the other one (on this x86_64 machine:
x86_64 and aarch64 guests, both under TCG: there is no usable KVM here) interleaved, so
machine load hits both alike:

1. ready: a boot (snapshot off), from the call to a passed probe;
2. ready: a clone of a snapshot template (made, or found in the cache, beforehand);
3. exec round trip: ``vm.run(["true"])`` in a running VM;
4. ``microvm run [--arch A] -- true`` as a whole process (a clone).

``--kernels`` adds, for the other architecture, a boot with Debian's kernel vs one with
the kernel built from source (built once, minutes, if not cached).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm import arch as arches
from pytest_microvm.machine import choose, detect_host
from pytest_microvm.machine.snapshot.policy import Templates


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interleaved(runs: int, fns: dict[str, Callable[[], float]], what: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs):
        for name, fn in fns.items():
            times[name].append(fn())
        say(f"{what} {i + 1}/{runs}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


def boot(image: GuestImage) -> float:
    start = time.monotonic()
    vm = MicroVM(VMConfig(image=image, arch=image.arch, snapshot=False)).start()
    took = time.monotonic() - start
    vm.stop()
    return took


def clone(templates: Templates, image: GuestImage) -> float:
    start = time.monotonic()
    vm = templates.start(VMConfig(image=image, arch=image.arch), name="clone")
    took = time.monotonic() - start
    assert vm.cloned, f"{image.arch} booted instead of cloning"
    vm.stop()
    return took


def exec_round_trips(vms: dict[str, MicroVM], execs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in vms}
    for _ in range(execs):
        for name, vm in vms.items():
            start = time.monotonic()
            vm.run(["true"], check=True)
            times[name].append(time.monotonic() - start)
    return times


def cli_run(arch: str) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "run", "--arch", arch, "--", "true"],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - start


def row(label: str, times: dict[str, list[float]], unit: str = "s") -> str:
    (a, ta), (b, tb) = times.items()
    ma, mb = statistics.median(ta), statistics.median(tb)
    scale = 1000.0 if unit == "ms" else 1.0
    return f"{label:<34}{ma * scale:10.3f} {mb * scale:10.3f} {mb / ma:8.2f}x   ({b} / {a}, {unit})"


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"], help="both images' kernel")
    ap.add_argument("--kernels", action="store_true", help="also: the other architecture's Debian vs source kernel")
    args = ap.parse_args()
    own = arches.host_name()
    other = next(a for a in arches.NAMES if a != own)
    images = {a: build_image(arch=a, kernel=args.kernel, progress=say) for a in (own, other)}
    templates = Templates()
    for image in images.values():  # the templates, made before anything is timed
        clone(templates, image)
    rows = [
        row("ready: boot", interleaved(args.runs, {a: lambda i=i: boot(i) for a, i in images.items()}, "boot")),
        row(
            "ready: clone",
            interleaved(args.runs, {a: lambda i=i: clone(templates, i) for a, i in images.items()}, "clone"),
        ),
    ]
    vms = {a: MicroVM(VMConfig(image=i, arch=a)).start() for a, i in images.items()}
    try:
        rows.append(row("exec round trip: run(['true'])", exec_round_trips(vms, args.execs), "ms"))
    finally:
        for vm in vms.values():
            vm.stop()
    rows.append(
        row("`microvm run -- true`", interleaved(args.runs, {a: lambda a=a: cli_run(a) for a in images}, "cli"))
    )
    if args.kernels:
        kernels = {k: build_image(arch=other, kernel=k, progress=say) for k in ("debian", "source")}
        times = interleaved(args.runs, {f"{other} {k}": lambda i=i: boot(i) for k, i in kernels.items()}, "kernels")
        rows.append(row(f"ready: boot, {other} kernels", times))
    paths = {a: choose(detect_host(arch=a)) for a in images}
    for a, choice in paths.items():
        print(f"{a}: {choice.accel}, vsock {choice.vsock}; QEMU {detect_host(arch=a).qemu_version}; "
              f"kernel {images[a].kernel_release} ({args.kernel})")  # fmt: skip
    print(f"{os.cpu_count()} cores; medians of {args.runs} (exec: {args.execs})")
    print(f"{'':34}{own:>10} {other:>10} {'ratio':>9}")
    for line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
