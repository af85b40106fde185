"""What the harness itself costs the host per fresh VM, beside QEMU: CPU and memory.

    .venv/bin/python bench/host_cost.py [--runs 15] [--held 8] [--kernel debian|source]

Under TCG the guest's own time hides ours; under KVM it shrinks about tenfold and what
the harness spends per VM becomes the floor of every fresh VM. So this counts CPU
seconds, not wall time, for a clone on the userspace vsock path that runs `true`:

1. CPU per clone, by process: this process (every thread: the RAM copy, QMP, the
   agent client), the VM's vsock backend, the fork server's own share, QEMU. Two sides,
   interleaved in one run: each VM's backend forked by this process's fork server (the
   default) vs an interpreter of its own (``MICROVM_VSOCK_BACKEND=own``, as before the
   fork server). Goal: ≤ 30 ms outside QEMU per clone.
2. host memory per idle clone: the drop of MemAvailable with ``--held`` clones held at
   once (after their probe and one `true`), per clone, both sides. Goal: ≤ 64 MiB
   (Debian's kernel, 256 MiB guest); the median of three rounds, interleaved. From it: how
   many idle clones fit in 16 GiB.
3. fresh VMs per minute (a clone that runs `true`, then stops), 4 at once (threads, as
   xdist workers would be processes) vs one after another, with the fork server.

The template is made (or found in the cache) before anything is measured. CPU times come
from /proc/<pid>/task/*/schedstat and CLOCK_PROCESS_CPUTIME_ID (nanoseconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import MicroVM, VMConfig, build_image
from pytest_microvm.channel.backends import fork_server
from pytest_microvm.machine import choose, detect_host
from pytest_microvm.machine.snapshot.policy import Templates

SIDES = ("fork", "own")


def _cpu(pid: int | None) -> float:
    """CPU seconds of a process's live threads, 0 if there is none or it is gone.

    From /proc/<pid>/task/*/schedstat (nanoseconds): the 10 ms ticks of /proc/<pid>/stat
    cannot see a forked backend's few milliseconds.
    """
    if pid is None:
        return 0.0
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return total / 1e9


def _self_cpu() -> float:
    return time.process_time()  # every thread of this process, in nanoseconds


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def one_clone(templates: Templates, config: VMConfig, side: str) -> dict[str, float]:
    """CPU seconds by process for one clone that runs `true`, with ``side``'s backend."""
    os.environ["MICROVM_VSOCK_BACKEND"] = side
    server_before = _cpu(fork_server().pid)
    harness_before = _self_cpu()
    vm = templates.start(config, name=f"cost-{side}")
    try:
        assert vm.cloned, "this configuration does not clone here: nothing to measure"
        vm.run(["true"], check=True)
        assert vm.channel is not None and vm.qemu is not None
        backend = _cpu(vm.channel.pids[0])
        qemu = _cpu(vm.qemu.pid)
    finally:
        vm.stop()
    return {
        "harness": _self_cpu() - harness_before,
        "backend": backend,
        # The server's own work for this VM (the fork); nothing when a backend is spawned.
        "server": _cpu(fork_server().pid) - server_before if side == "fork" else 0.0,
        "qemu": qemu,
    }


def held_memory(templates: Templates, config: VMConfig, side: str, held: int) -> float:
    """MemAvailable drop per idle clone, ``held`` clones at once (bytes)."""
    os.environ["MICROVM_VSOCK_BACKEND"] = side
    time.sleep(1)
    before = _mem_available()
    vms: list[MicroVM] = []
    try:
        for i in range(held):
            vm = templates.start(config, name=f"held-{side}-{i}")
            vm.run(["true"], check=True)
            vms.append(vm)
        time.sleep(1)
        return (before - _mem_available()) / held
    finally:
        for vm in vms:
            vm.stop()


def per_minute(templates: Templates, config: VMConfig, at_once: int, total: int) -> float:
    """Clones that start, run `true` and stop, per minute, ``at_once`` at a time."""
    os.environ["MICROVM_VSOCK_BACKEND"] = "fork"
    left = list(range(total))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not left or errors:
                    return
                i = left.pop()
            try:
                with templates.start(config, name=f"rate{i}") as vm:
                    vm.run(["true"], check=True)
            except BaseException as exc:
                errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return total / (time.monotonic() - start) * 60


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--held", type=int, default=8, help="clones held at once for the memory row")
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"], help="the image's kernel")
    ap.add_argument("--rate-vms", type=int, default=24, help="clones per side of the VMs-per-minute row (0: skip)")
    args = ap.parse_args()
    image, host = build_image(kernel=args.kernel), detect_host()
    config = VMConfig(image=image, vsock="userspace")
    templates = Templates()
    for side in SIDES:  # the template, and the fork server, exist before anything is measured
        one_clone(templates, config, side)
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for i in range(args.runs):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:  # interleaved, each first in turn
            runs[side].append(one_clone(templates, config, side))
        print(f"run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
    held: dict[str, list[float]] = {side: [] for side in SIDES}
    for i in range(3):  # interleaved too: MemAvailable moves with everything else on the host
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            held[side].append(held_memory(templates, config, side, args.held))
    memory = {side: statistics.median(values) for side, values in held.items()}
    rates = {n: per_minute(templates, config, n, args.rate_vms) for n in (4, 1)} if args.rate_vms else {4: 0.0, 1: 0.0}

    def med(side: str, *parts: str) -> float:
        return statistics.median(sum(r[p] for p in parts) for r in runs[side]) * 1000

    print(
        f"path: {choose(host, vsock='userspace').why}; QEMU {host.qemu_version}; kernel {image.kernel_release} "
        f"({args.kernel}); {os.cpu_count()} cores; {args.runs} clones per side, interleaved"
    )
    print(f"{'per clone that runs `true` (medians)':<48}{'fork server':>12}{'own interp.':>12}{'ratio':>8}")
    rows = [
        ("CPU of this process, all threads (ms)", ("harness",)),
        ("CPU of the VM's vsock backend (ms)", ("backend",)),
        ("CPU of the fork server for it (ms)", ("server",)),
        ("CPU outside QEMU, all of ours (ms)", ("harness", "backend", "server")),
        ("CPU of QEMU (ms)", ("qemu",)),
    ]
    for label, parts in rows:
        fork, own = med("fork", *parts), med("own", *parts)
        ratio = f"{fork / own:7.2f}x" if own else "      -"
        print(f"{label:<48}{fork:12.1f}{own:12.1f} {ratio}")
    print(
        f"{f'host memory per idle clone, {args.held} held (MiB)':<48}"
        f"{memory['fork'] / (1 << 20):12.1f}{memory['own'] / (1 << 20):12.1f} {memory['fork'] / memory['own']:7.2f}x"
    )
    print(f"idle clones that fit in 16 GiB: {16 * 1024 / (memory['fork'] / (1 << 20)):.0f} (fork server)")
    if args.rate_vms:
        print(
            f"fresh VMs per minute (clone, `true`, stop): 4 at once {rates[4]:.1f} vs one after another "
            f"{rates[1]:.1f} ({rates[4] / rates[1]:.2f}x)"
        )
    print("goals: ≤ 30 ms CPU outside QEMU per clone; ≤ 64 MiB per idle clone (Debian's kernel, 256 MiB guest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
