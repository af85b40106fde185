"""Boot-to-ready of a MicroVM beside a bare boot of the same kernel and initramfs.

    .venv/bin/python bench/boot.py [--runs 7] [--execs 200] [--kernel debian|source]

- bare boot: QEMU start → QEMU exit, with an init that powers off at once
  (``rdinit=/sbin/poweroff -- -f``): the floor any harness pays for this kernel
- ready: ``MicroVM.start()`` from call to a passed probe (backend, QEMU, boot, modules,
  vsock connect, HELLO, probe round-trip)
- exec round trip: ``vm.run(["true"])`` on a booted VM, median and p95

Runs interleave (bare, ready, bare, ready, …) so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import MicroVM, VMConfig, build_image
from pytest_microvm.machine import choose, detect_host, qemu_argv


def bare_boot(image, host, workdir: Path) -> float:  # type: ignore[no-untyped-def]
    argv = qemu_argv(
        image, qemu=host.qemu, accel=host.accel, console=workdir / "bare.log",
        cmdline=["rdinit=/sbin/poweroff", "--", "-f"],
    )  # fmt: skip
    start = time.monotonic()
    subprocess.run(argv, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def ready(image) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    vm = MicroVM(VMConfig(image=image)).start()
    elapsed = time.monotonic() - start
    vm.stop()
    return elapsed


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the VM and its temp directory are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"], help="the image's kernel")
    args = ap.parse_args()
    image, host = build_image(kernel=args.kernel), detect_host()
    choice = choose(host)
    bare: list[float] = []
    up: list[float] = []
    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        for i in range(args.runs):
            bare.append(bare_boot(image, host, Path(tmp)))
            up.append(ready(image))
            print(f"run {i + 1}/{args.runs}: bare {bare[-1]:.2f}s, ready {up[-1]:.2f}s", file=sys.stderr, flush=True)
    with MicroVM(VMConfig(image=image)) as vm:
        for _ in range(20):
            vm.run(["true"])  # warm up
        rtt = []
        for _ in range(args.execs):
            start = time.perf_counter()
            vm.run(["true"])
            rtt.append(time.perf_counter() - start)
    mb, mu = statistics.median(bare), statistics.median(up)
    print(f"path: {choice.why}")
    print(f"kernel {image.kernel_release} ({args.kernel}, {'PVH vmlinux' if image.pvh else 'bzImage'}), "
          f"QEMU {host.qemu_version}, "
          f"{args.runs} runs")  # fmt: skip
    print(f"bare boot to poweroff   median {mb:.2f} s")
    print(f"MicroVM boot to ready   median {mu:.2f} s   ratio {mu / mb:.2f}")
    print(f"exec round trip (true)  median {statistics.median(rtt) * 1e3:.1f} ms   p95 {p95(rtt) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
