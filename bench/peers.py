"""pytest-microvm beside its peers, in one run: one table of medians and ratios.

    .venv/bin/python bench/peers.py [--runs 3] [--kernel debian|source] [--install-modules]

--kernel picks the image for every row (default: Debian's kernel; `source`: the small
kernel built from source, see README). virtme-ng boots the same kernel file.

1. a command in a fresh VM: `microvm run -- true` vs virtme-ng
   (`vng --run <same kernel> --disable-kvm --force-9p --exec true`; --disable-kvm only
   where KVM is unusable). With Debian's kernel virtme-ng needs its modules in
   /lib/modules/<release>; --install-modules puts them there (root; it changes the host).
   The kernel built from source has everything built in and needs none.
2. exec round trip and 64 MiB of stdout: the agent vs paramiko SSH, same VM
3. 4 VMs booted at once vs one after another (VMs per minute)
4. host memory per VM: QEMU + backend RSS, anonymous and file-backed apart, guest RAM excluded
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm.cache import cache_dir
from pytest_microvm.machine import choose, detect_host

MIB = 1 << 20


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    return time.monotonic() - start, proc


def vng_setup(image: GuestImage, install: bool) -> tuple[list[str] | None, str]:
    vng = shutil.which("vng")
    if vng is None:
        return None, "virtme-ng not installed (pip install virtme-ng)"
    # The kernel file we boot. A kernel with everything built in (the one built from
    # source) goes to virtme-ng as the very ELF vmlinux of the image; Debian's goes as the
    # package's bzImage, as virtme-ng expects (it reads the release from it to find the
    # modules); every cache entry of that release holds the same one.
    kernel_file: Path | None = image.kernel
    if image.modules:
        kernel_file = next(
            (
                d / "kernel"
                for d in sorted((cache_dir() / "kernels").glob("*/"))
                if (d / "release").is_file() and (d / "release").read_text().strip() == image.kernel_release
            ),
            None,
        )
    if kernel_file is None:
        return None, "the image's kernel is not in the cache"
    moddir = Path("/lib/modules") / image.kernel_release
    if image.modules and not moddir.exists():
        if not install:
            return None, f"virtme-ng needs {moddir}; rerun with --install-modules (root, changes the host)"
        # Our cache keeps only the modules the image needs; virtme needs the package's tree.
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", f"linux-image-{image.kernel_release}"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), "/"], check=True)
        subprocess.run(["depmod", image.kernel_release], check=True)
    argv = [vng, "--run", str(kernel_file), "--force-9p"]
    if not detect_host().kvm.usable:
        argv.append("--disable-kvm")
    return argv, "ok"


def fresh_vm_command(image: GuestImage, kernel: str, runs: int, install: bool) -> list[str]:
    ours_argv = [sys.executable, "-m", "pytest_microvm.cli", "run", "--kernel", kernel, "--", "true"]
    vng_argv, why = vng_setup(image, install)
    ours, theirs = [], []
    for i in range(runs):
        t, proc = timed(ours_argv)
        assert proc.returncode == 0, proc.stderr
        ours.append(t)
        if vng_argv is not None:
            # vng exits 255 here even when the command ran; check that it did, not its status.
            t, proc = timed([*vng_argv, "--verbose", "--exec", "echo VNG-RAN-IT"])
            if b"VNG-RAN-IT" not in proc.stdout + proc.stderr:
                raise RuntimeError(f"virtme-ng did not run the command: {proc.stderr[-1000:]!r}")
            theirs.append(t)
        say(f"fresh VM {i + 1}/{runs}: microvm run {ours[-1]:.2f}s" + (f", vng {theirs[-1]:.2f}s" if theirs else ""))
    mo = statistics.median(ours)
    if not theirs:
        return [f"command in a fresh VM (s)      {mo:10.2f} {'-':>12} {'-':>8}   virtme-ng: {why}"]
    mt = statistics.median(theirs)
    return [f"command in a fresh VM (s)      {mo:10.2f} {mt:12.2f} {mt / mo:7.1f}x  faster than virtme-ng"]


def agent_vs_ssh(kernel: str, runs: int) -> list[str]:
    ssh_image = build_image(kernel=kernel, features=("ssh",))
    with MicroVM(VMConfig(image=ssh_image, memory_mib=512)) as vm:
        client = vm.ssh()

        def ssh_exec(cmd: str) -> bytes:
            _in, out, _err = client.exec_command(cmd)
            data = out.read()
            out.channel.recv_exit_status()
            return data

        for _ in range(5):
            vm.run(["true"])
            ssh_exec("true")
        agent_rtt: list[float] = []
        ssh_rtt: list[float] = []
        # Alternating blocks of 10: both sides see the same machine load, and the work
        # dropbear (or the agent) still does after a call returns (closing the channel,
        # reaping) does not land in the other side's next timing on the one vCPU.
        for _ in range(10):
            for run, times in ((lambda: vm.run(["true"])), agent_rtt), ((lambda: ssh_exec("true")), ssh_rtt):
                time.sleep(0.05)
                for _ in range(10):
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
        agent_tp, ssh_tp = [], []
        # dd with 64 KiB blocks: busybox head/cat read 4 KiB at a time, which under TCG
        # is slower than either channel and would measure the command, not the channel.
        cmd = "dd if=/dev/zero bs=65536 count=1024 2>/dev/null"
        for i in range(runs):
            t = time.perf_counter()
            assert len(vm.run(cmd, timeout=300).stdout) == 64 * MIB
            agent_tp.append(64 * MIB / (time.perf_counter() - t) / 1e6)
            t = time.perf_counter()
            assert len(ssh_exec(cmd)) == 64 * MIB
            ssh_tp.append(64 * MIB / (time.perf_counter() - t) / 1e6)
            say(f"stdout 64 MiB {i + 1}/{runs}: agent {agent_tp[-1]:.0f} MB/s, ssh {ssh_tp[-1]:.0f} MB/s")
    ar, sr = statistics.median(agent_rtt) * 1e3, statistics.median(ssh_rtt) * 1e3
    at, st = statistics.median(agent_tp), statistics.median(ssh_tp)
    return [
        f"exec round trip `true` (ms)    {ar:10.1f} {sr:12.1f} {ar / sr:7.2f}x  of SSH's time",
        f"64 MiB stdout (MB/s)           {at:10.0f} {st:12.0f} {at / st:7.1f}x  SSH's throughput",
    ]


def vms_per_minute(image: GuestImage) -> list[str]:
    def cycle() -> None:
        with MicroVM(VMConfig(image=image)) as vm:
            vm.run(["true"], check=True)

    start = time.monotonic()
    for _ in range(4):
        cycle()
    sequential = time.monotonic() - start
    start = time.monotonic()
    threads = [threading.Thread(target=cycle) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parallel = time.monotonic() - start
    say(f"4 VMs: one after another {sequential:.1f}s, at once {parallel:.1f}s")
    seq_rate, par_rate = 4 * 60 / sequential, 4 * 60 / parallel
    return [f"VMs per minute (at once/seq.)  {par_rate:10.1f} {seq_rate:12.1f} {par_rate / seq_rate:7.2f}x"]


def host_memory(image: GuestImage) -> list[str]:
    def rss_kib(pid: int) -> tuple[int, int]:
        # (anonymous, file-backed) resident memory. Guest RAM is the shared memfd
        # (RssShmem) that QEMU and the backend both map: excluded, it is the guest's. The
        # file-backed part is page cache (QEMU, its libraries, the kernel image it keeps
        # mapped) that VMs of the same image share; the anonymous part (mostly TCG's
        # translated code) is what each further VM adds.
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]), int(fields["RssFile"].split()[0])

    with MicroVM(VMConfig(image=image)) as vm:
        vm.run(["true"])
        assert vm.qemu is not None and vm.qemu.pid is not None and vm.vsock is not None and vm.vsock.pid
        (qa, qf), (ba, bf) = rss_kib(vm.qemu.pid), rss_kib(vm.vsock.pid)
    anon, files = (qa + ba) / 1024, (qf + bf) / 1024
    return [f"host memory per VM (MiB)       {anon:10.1f} {'-':>12} {'-':>8}   anonymous: QEMU {qa / 1024:.1f} + "
            f"backend {ba / 1024:.1f}; plus {files:.1f} file-backed, shared by VMs; guest RAM excluded"]  # fmt: skip


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--install-modules", action="store_true", help="let virtme-ng find the kernel's modules")
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"], help="the image's kernel")
    args = ap.parse_args()
    image, host = build_image(kernel=args.kernel), detect_host()
    rows = []
    rows += fresh_vm_command(image, args.kernel, args.runs, args.install_modules)
    rows += agent_vs_ssh(args.kernel, args.runs)
    rows += vms_per_minute(image)
    rows += host_memory(image)
    print(f"path: {choose(host).why}; QEMU {host.qemu_version}; kernel {image.kernel_release} ({args.kernel}); "
          f"{os.cpu_count()} cores; medians of {args.runs}")  # fmt: skip
    print(f"{'':31}{'microvm':>10} {'peer':>12} {'ratio':>8}")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
