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

A peer's run is judged by its command's output, not its exit status: virtme-ng's command
prints a marker unique to the run, and the run counts only when the marker comes back.
virtme-ng's guest init finds no /dev/virtio-ports/ links on these machines (the ports exist
in sysfs, the links do not), so it runs the command on the console fallback and exits 255
even when the command succeeded. A failed run of a peer does not stop the benchmark: it is
counted, shown in the table (with why, under it) and retried once.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PeerRun:
    """One try of a peer's command: how long it took, whether the command ran, and if not, why."""

    seconds: float
    ran: bool
    why: str = ""


def marked_command(token: str) -> tuple[str, str]:
    """(the shell command, the marker it prints). The marker is not written in the command:
    anything that merely echoes the command line (vng --verbose) cannot fake a run."""
    return f"printf 'PEER-RAN-%s\\n' {token}", f"PEER-RAN-{token}"


def judge(seconds: float, returncode: int, output: bytes, marker: str) -> PeerRun:
    """Did the command run? Its marker in the output says so; the exit status does not (see
    the module's docstring: virtme-ng exits 255 here even when the command succeeded)."""
    if marker.encode() in output:
        return PeerRun(seconds, True)
    tail = output.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return PeerRun(seconds, False, f"exit status {returncode}, no marker in the output; last line: {tail[0][:200]}")


def with_one_retry(attempt: Callable[[], PeerRun]) -> tuple[float | None, list[PeerRun]]:
    """Try a peer's run, and once more if it failed: (the time of the try that ran, or None
    when neither did; the failed tries, to count and show)."""
    failed: list[PeerRun] = []
    for _ in range(2):
        run = attempt()
        if run.ran:
            return run.seconds, failed
        failed.append(run)
    return None, failed


def fresh_vm_row(ours: list[float], theirs: list[float], failed: int, why: str) -> str:
    """The table row: medians of the runs that ran, and how many of the peer's tries failed."""
    mo = statistics.median(ours)
    tries = len(theirs) + failed
    failures = f"; virtme-ng failed {failed} of {tries} tries (a failed try is retried once)" if failed else ""
    if why != "ok":
        return f"command in a fresh VM (s)      {mo:10.2f} {'-':>12} {'-':>8}   virtme-ng: {why}"
    if not theirs:
        return f"command in a fresh VM (s)      {mo:10.2f} {'-':>12} {'-':>8}   virtme-ng failed all {tries} tries"
    mt = statistics.median(theirs)
    return f"command in a fresh VM (s)      {mo:10.2f} {mt:12.2f} {mt / mo:7.1f}x  faster than virtme-ng{failures}"


def vng_once(vng_argv: list[str]) -> PeerRun:
    command, marker = marked_command(secrets.token_hex(8))
    try:
        t, proc = timed([*vng_argv, "--verbose", "--exec", command])
    except subprocess.TimeoutExpired as exc:
        return PeerRun(float(exc.timeout), False, f"timed out after {exc.timeout:.0f}s")
    return judge(t, proc.returncode, proc.stdout + proc.stderr, marker)


def vng_measure(vng_argv: list[str], label: str, theirs: list[float], failed: list[PeerRun]) -> str:
    """One virtme-ng run, retried once if it did not run: its time goes to ``theirs``, failed
    tries to ``failed`` (and are said at once); returns the text for the progress line."""
    seconds, failures = with_one_retry(functools.partial(vng_once, vng_argv))
    failed += failures
    for run in failures:
        say(f"{label}: virtme-ng did not run the command ({run.why})")
    if seconds is None:
        return ", vng failed twice"
    theirs.append(seconds)
    return f", vng {seconds:.2f}s"


def fresh_vm_command(image: GuestImage, kernel: str, runs: int, install: bool) -> tuple[list[str], list[str]]:
    """(the table's row, the notes to print under the table)."""
    ours_argv = [sys.executable, "-m", "pytest_microvm.cli", "run", "--kernel", kernel, "--", "true"]
    vng_argv, why = vng_setup(image, install)
    ours: list[float] = []
    theirs: list[float] = []
    failed: list[PeerRun] = []
    for i in range(runs):
        t, proc = timed(ours_argv)
        assert proc.returncode == 0, proc.stderr
        ours.append(t)
        line = f"fresh VM {i + 1}/{runs}: microvm run {ours[-1]:.2f}s"
        if vng_argv is not None:
            line += vng_measure(vng_argv, f"fresh VM {i + 1}/{runs}", theirs, failed)
        say(line)
    notes = []
    if vng_argv is not None:
        notes.append(
            "note: a virtme-ng run counts when the marker its command prints comes back, whatever vng's exit "
            "status: its guest init finds no /dev/virtio-ports/ links here (the ports exist in sysfs), runs the "
            "command on the console fallback and exits 255 even when the command succeeded. A failed try is "
            "counted in the row and retried once."
        )
        notes += [f"note: virtme-ng try failed: {run.why}" for run in failed]
    return [fresh_vm_row(ours, theirs, len(failed), why)], notes


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
        assert vm.qemu is not None and vm.qemu.pid is not None and vm.channel is not None and vm.channel.pids
        (qa, qf), (ba, bf) = rss_kib(vm.qemu.pid), rss_kib(vm.channel.pids[0])
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
    rows, notes = fresh_vm_command(image, args.kernel, args.runs, args.install_modules)
    rows += agent_vs_ssh(args.kernel, args.runs)
    rows += vms_per_minute(image)
    rows += host_memory(image)
    print(f"path: {choose(host).why}; QEMU {host.qemu_version}; kernel {image.kernel_release} ({args.kernel}); "
          f"{os.cpu_count()} cores; medians of {args.runs}")  # fmt: skip
    print(f"{'':31}{'microvm':>10} {'peer':>12} {'ratio':>8}")
    for row in rows:
        print(row)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
