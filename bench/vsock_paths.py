"""The two vsock paths side by side: kernel vhost-vsock vs the userspace backend, same host, one run.

    .venv/bin/python bench/vsock_paths.py [--execs 50] [--runs 3] [--mib 64] [--kernel source|debian]
    scripts/nested --bench [-- --mib 8]      # on a host without /dev/vhost-vsock (CI machines)

- exec round trip: ``vm.run(["true"])``, median of ``--execs`` per path
- stdout throughput: ``vm.run("head -c <mib> MiB /dev/zero")``, the whole output back on the
  host, median of ``--runs`` per path

One VM per path, both up at once; measurements alternate between them (and which goes
first) so that load on a shared machine hits both alike. Prints the medians, the ratio
kernel / userspace, and the hardware path: accelerator, and whether this host is itself a
nested guest (scripts/nested), where every figure is TCG inside TCG.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import MicroVM, VMConfig, build_image
from pytest_microvm.machine import choose, detect_host

PATHS = ("kernel", "userspace")


def nested() -> bool:
    """True inside a pytest-microvm guest (scripts/nested's L1): its kernel command line says so."""
    try:
        return "microvm.token=" in Path("/proc/cmdline").read_text()
    except OSError:
        return False


def exec_rtt(vm: MicroVM) -> float:
    start = time.monotonic()
    vm.run(["true"], check=True)
    return time.monotonic() - start


def stdout_mib_s(vm: MicroVM, mib: int) -> float:
    start = time.monotonic()
    r = vm.run(f"head -c {mib * 1024 * 1024} /dev/zero", timeout=3600)
    elapsed = time.monotonic() - start
    assert len(r.stdout) == mib * 1024 * 1024 and r.exit_code == 0, (len(r.stdout), r.exit_code)
    return mib / elapsed


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the VMs are stopped
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execs", type=int, default=50, help="exec round trips per path (default 50)")
    ap.add_argument("--runs", type=int, default=3, help="stdout transfers per path (default 3)")
    ap.add_argument("--mib", type=int, default=64, help="MiB of stdout per transfer (default 64)")
    ap.add_argument("--kernel", default="source", choices=["debian", "source"], help="the guests' kernel")
    args = ap.parse_args()

    host = detect_host()
    if not host.vhost_vsock.usable:
        print(f"error: the kernel path needs /dev/vhost-vsock ({host.vhost_vsock.reason}); "
              "on such a host run this through scripts/nested --bench", file=sys.stderr)  # fmt: skip
        return 2
    accel = choose(host).accel
    where = f"accel={accel}" + (", nested: inside an L1 guest under TCG (TCG inside TCG)" if nested() else "")
    print(f"vsock paths benchmark: {where}; kernel {args.kernel}", flush=True)
    image = build_image(kernel=args.kernel)
    vms: dict[str, MicroVM] = {}
    try:
        for path in PATHS:
            vms[path] = MicroVM(VMConfig(image=image, vsock=path, snapshot=False, boot_timeout=600), name=path).start()
            print(f"  {path}: ready in {vms[path].ready_seconds:.1f}s", flush=True)
        rtt: dict[str, list[float]] = {p: [] for p in PATHS}
        for i in range(args.execs):
            for path in PATHS if i % 2 == 0 else PATHS[::-1]:
                rtt[path].append(exec_rtt(vms[path]))
        rate: dict[str, list[float]] = {p: [] for p in PATHS}
        for i in range(args.runs):
            for path in PATHS if i % 2 == 0 else PATHS[::-1]:
                rate[path].append(stdout_mib_s(vms[path], args.mib))
                print(f"  {path}: {args.mib} MiB of stdout at {rate[path][-1]:.3f} MiB/s", flush=True)
    finally:
        for vm in vms.values():
            vm.stop()

    med_rtt = {p: statistics.median(v) for p, v in rtt.items()}
    med_rate = {p: statistics.median(v) for p, v in rate.items()}
    print(f"\n{'':28} {'kernel':>12} {'userspace':>12} {'kernel/userspace':>17}")
    print(f"{'exec round trip (median)':28} {med_rtt['kernel'] * 1e3:>10.1f}ms {med_rtt['userspace'] * 1e3:>10.1f}ms "
          f"{med_rtt['kernel'] / med_rtt['userspace']:>16.2f}x")  # fmt: skip
    print(f"{f'{args.mib} MiB stdout (median)':28} {med_rate['kernel']:>8.3f}MiB/s {med_rate['userspace']:>8.3f}MiB/s "
          f"{med_rate['kernel'] / med_rate['userspace']:>16.2f}x")  # fmt: skip
    print(f"({args.execs} round trips and {args.runs} transfers per path; {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
