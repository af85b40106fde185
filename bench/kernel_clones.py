"""Snapshot clones on the kernel vhost-vsock path beside boots and beside the userspace path.

    scripts/nested --memory 6144 -- .venv/bin/python bench/kernel_clones.py [--runs 5] [--kernel source]

Needs a usable /dev/vhost-vsock (here: inside scripts/nested, whose L1 guest has one).
Side by side in one run, interleaved so that load hits all alike:

1. ready time (call to a passed probe): a boot on the kernel path; a kernel-path clone that
   keeps the template's vsock device (what clones do); one whose device is unplugged from
   the template and plugged into the clone (the other way, measured to choose); a clone on
   the userspace path. Ratios: clone/boot (goal ≤ 0.1), kept/plugged, kernel/userspace.
2. guest RAM a clone owns after its probe and one ``true``: on the kernel path the private
   dirty pages of its copy-on-write mapping of the template's RAM file (goal ≤ 8 MiB with
   the kernel built from source); on the userspace path the memory its RAM copy holds
   (the template guest's touched pages, and what the clone wrote since).
3. host memory per idle clone: the drop of MemAvailable with ``--hold`` clones held at
   once, on each path (give the L1 room: ``scripts/nested --memory``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import MicroVM, VMConfig, build_image
from pytest_microvm.machine import HostReport, choose, detect_host, launch
from pytest_microvm.machine.snapshot.key import template_key
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.snapshot.store import Template, make_template
from pytest_microvm.machine.snapshot.strategies import PluggedVsock, RestoreClone, save_template

MIB = 1 << 20


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(start: Callable[[], MicroVM]) -> tuple[float, MicroVM]:
    began = time.monotonic()
    vm = start()
    return time.monotonic() - began, vm


def mapping_kib(pid: int, needle: str, field: str) -> int:
    """``field`` (e.g. Private_Dirty) of the mappings in ``pid`` whose name contains ``needle``."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[0].isupper():  # a mapping's header: "addr-addr perms offset dev inode [name]"
            inside = needle in line
        elif inside and line.startswith(field + ":"):
            total += int(line.split()[1])
    return total


def owned_mib(vm: MicroVM) -> float:
    """Guest RAM this clone holds of its own (see the module docstring)."""
    assert vm.qemu is not None and vm.qemu.pid is not None and isinstance(vm.launch, RestoreClone)
    if vm.channel is not None and vm.channel.shared_memory:  # a copy in a memfd: all of it is the clone's
        for fd in os.listdir(f"/proc/{vm.qemu.pid}/fd"):
            if "clone-ram" in os.readlink(f"/proc/{vm.qemu.pid}/fd/{fd}"):
                return os.stat(f"/proc/{vm.qemu.pid}/fd/{fd}").st_blocks * 512 / MIB
        raise RuntimeError("no clone RAM memfd in QEMU")
    return mapping_kib(vm.qemu.pid, str(vm.launch.template.ram), "Private_Dirty") / 1024


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: VMs stopped
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="source", help="debian | source (default)")
    ap.add_argument("--cmdline", default="", help="extra guest kernel arguments, e.g. init_on_alloc=0")
    ap.add_argument("--hold", type=int, default=8, help="clones held at once for the memory figure")
    args = ap.parse_args()
    host = detect_host()
    if not host.vhost_vsock.usable:
        say(f"bench: {host.vhost_vsock.reason}: run this through scripts/nested")
        return 2
    image = build_image(kernel=args.kernel, progress=lambda m: say(f"image: {m}"))
    extra = tuple(args.cmdline.split())
    kernel_cfg = VMConfig(image=image, vsock="kernel", kernel_cmdline=extra, boot_timeout=900)
    user_cfg = kernel_cfg.with_(vsock="userspace")
    cache = Path(tempfile.mkdtemp(prefix="bench-templates-"))
    templates = Templates(cache)
    plugged = _plugged_template(kernel_cfg, host, cache / "plugged")
    say("templates: making the kernel-path and userspace ones")
    for cfg in (kernel_cfg, user_cfg):
        templates.start(cfg, host=host, name="warm").stop()

    ready: dict[str, list[float]] = {"boot": [], "kept": [], "plugged": [], "userspace": []}
    owned: dict[str, list[float]] = {"kept": [], "userspace": []}
    starts: dict[str, Callable[[], MicroVM]] = {
        "boot": lambda: launch.start(lambda: MicroVM(kernel_cfg.with_(snapshot=False), host=host, name="boot")),
        "kept": lambda: templates.start(kernel_cfg, host=host, name="kept"),
        "plugged": lambda: launch.start(
            lambda: MicroVM(kernel_cfg, host=host, name="plugged", launch=RestoreClone(plugged, vsock=PluggedVsock()))
        ),
        "userspace": lambda: templates.start(user_cfg, host=host, name="userspace"),
    }
    for run in range(1, args.runs + 1):
        for what, start in starts.items():
            seconds, vm = timed(start)
            try:
                assert vm.cloned == (what != "boot"), f"{what}: expected {'a boot' if what == 'boot' else 'a clone'}"
                vm.run(["true"], check=True)
                if what in owned:
                    owned[what].append(owned_mib(vm))
            finally:
                vm.stop()
            ready[what].append(seconds)
        say(f"run {run}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in ready.items()))

    held: dict[str, float] = {}
    for what, cfg in (("kept", kernel_cfg), ("userspace", user_cfg)):
        vms: list[MicroVM] = []
        time.sleep(2)
        before = mem_available_mib()
        try:
            for i in range(args.hold):
                vms.append(templates.start(cfg, host=host, name=f"held{i}"))
                vms[-1].run(["true"], check=True)
            time.sleep(2)
            held[what] = (before - mem_available_mib()) / args.hold
        finally:
            for vm in vms:
                vm.stop()
        say(f"{args.hold} {what} clones held: {held[what]:.1f} MiB each")

    med = {k: statistics.median(v) for k, v in ready.items()}
    choice = choose(host, "auto", "kernel")
    print(f"path: {choice.accel} ({host.kvm.reason}); kernel vhost-vsock vs the userspace backend; "
          f"kernel {image.kernel_release} ({args.kernel}{', ' + args.cmdline if args.cmdline else ''}); "
          f"QEMU {host.qemu_version}; {args.runs} runs, medians")  # fmt: skip
    print(f"{'what':46} {'median':>9}")
    print(f"{'boot to ready, kernel path':46} {med['boot']:8.2f}s")
    print(f"{'clone to ready, kernel path (device kept)':46} {med['kept']:8.2f}s   "
          f"{med['kept'] / med['boot']:.3f}x the boot (goal <= 0.1x)")  # fmt: skip
    print(f"{'clone to ready, kernel path (device plugged)':46} {med['plugged']:8.2f}s   "
          f"kept/plugged {med['kept'] / med['plugged']:.2f}x")  # fmt: skip
    print(f"{'clone to ready, userspace path':46} {med['userspace']:8.2f}s   "
          f"kernel/userspace {med['kept'] / med['userspace']:.2f}x")  # fmt: skip
    for what, label in (("kept", "kernel path (copy-on-write)"), ("userspace", "userspace path (a copy)")):
        print(f"{'guest RAM a clone owns, ' + label:46} {statistics.median(owned[what]):7.1f} MiB")
    for what, label in (("kept", "kernel path"), ("userspace", "userspace path")):
        print(f"{f'host memory per idle clone ({args.hold} held), ' + label:46} {held[what]:7.1f} MiB")
    return 0


def _plugged_template(config: VMConfig, host: HostReport, cache: Path) -> Template:
    """A kernel-path template saved without its vsock device, for clones that plug one."""
    assert config.image is not None
    key = template_key(config, config.image, host)
    image = config.image
    return make_template(
        key, config.memory_mib, lambda staging: save_template(config, image, host, staging, vsock=PluggedVsock()), cache
    )


if __name__ == "__main__":
    sys.exit(main())
