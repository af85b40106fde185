"""Throughput and latency of the userspace vsock backend beside QEMU's virtio-serial.

One VM carries both channels, so both numbers come from the same guest, the same
accelerator and the same moment of machine load; the ratio is what to read.

    .venv/bin/python bench/vsock_throughput.py [--runs 5] [--mib 64]

Measured (median of --runs):
  guest→host MB/s    guest sends a file from tmpfs; the host reads to the end
                     (vsock: microvm-agent --connect < file; serial: dd if=file of=port)
  host→guest MB/s    the host writes N MiB; the guest reads it into /dev/null
                     (vsock: microvm-agent --listen > /dev/null; serial: dd if=port of=/dev/null)
  1-byte round trip  one byte echoed by the guest on an open connection (median of 200)
  connection rtt     vsock only: CONNECT/OK, a 1-byte echo, close (median of 100)
Both channels take the data from the same place with one copy in the guest.
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import build_image
from pytest_microvm.client import Process
from pytest_microvm.machine import detect_host
from tests.integration.vsock_vm import VsockVM, vsock_vm

MIB = 1 << 20


def serial_args(path: Path) -> list[str]:
    return [
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=bench,path={path},server=on,wait=off",
        "-device", "virtserialport,bus=vser.0,chardev=bench,name=bench",
    ]  # fmt: skip


def drain(sock: socket.socket, total: int) -> None:
    got = 0
    buf = bytearray(1 << 20)
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            raise RuntimeError(f"stream ended after {got} of {total} bytes")
        got += n


SRC = "/tmp/bench.src"  # the guest-side payload, in tmpfs: both channels read the same file


def g2h_vsock(vm: VsockVM, mib: int) -> float:
    with vm.vsock.listen(5100) as listener:
        start = time.monotonic()
        proc = vm.client.start(f"microvm-agent --connect 2:5100 < {SRC}")
        conn = listener.accept(60)
        conn.settimeout(120)
        drain(conn, mib * MIB)
        elapsed = time.monotonic() - start
        conn.close()
    assert proc.wait(timeout=60).exit_code == 0
    return mib * MIB / elapsed / 1e6


def g2h_serial(vm: VsockVM, port: str, ser: socket.socket, mib: int) -> float:
    start = time.monotonic()
    proc = vm.client.start(f"dd if={SRC} of={port} bs=64k 2>/dev/null")
    drain(ser, mib * MIB)
    elapsed = time.monotonic() - start
    assert proc.wait(timeout=60).exit_code == 0
    return mib * MIB / elapsed / 1e6


def _send(sock: socket.socket, mib: int) -> None:
    block = b"\0" * MIB
    for _ in range(mib):
        sock.sendall(block)


def h2g_vsock(vm: VsockVM, mib: int) -> float:
    proc = vm.client.start("microvm-agent --listen 5101 </dev/null >/dev/null")
    sock = connect_retry(vm, 5101)
    start = time.monotonic()
    _send(sock, mib)
    sock.close()
    assert proc.wait(timeout=120).exit_code == 0
    return mib * MIB / (time.monotonic() - start) / 1e6


def h2g_serial(vm: VsockVM, port: str, ser: socket.socket, mib: int) -> float:
    dd = f"dd if={port} of=/dev/null bs=64k count={mib * MIB} iflag=count_bytes,fullblock"
    proc = vm.client.start(f"{dd} 2>/dev/null")
    time.sleep(0.2)  # let the guest open the port before the first byte
    start = time.monotonic()
    _send(ser, mib)
    assert proc.wait(timeout=120).exit_code == 0
    return mib * MIB / (time.monotonic() - start) / 1e6


def connect_retry(vm: VsockVM, port: int) -> socket.socket:
    for _ in range(200):
        try:
            return vm.vsock.connect(port)
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"guest port {port} never listened")


def rtt(sock: socket.socket, n: int = 200) -> float:
    sock.settimeout(10)  # a broken echo fails the run instead of hanging it
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("echo mismatch")
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def rtt_vsock(vm: VsockVM) -> float:
    with connect_retry(vm, 5102) as sock:
        return rtt(sock)


def rtt_serial(vm: VsockVM, port: str, ser: socket.socket) -> float:
    # A port opens only once: one read-write fd serves as both stdin and stdout.
    proc = vm.client.start(f"cat 0<>{port} 1>&0")
    time.sleep(0.3)
    try:
        return rtt(ser)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def connection_round_trip(vm: VsockVM, n: int = 100) -> float:
    """A whole connection through the backend: CONNECT/OK, 1 byte echoed, close."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        with vm.vsock.connect(5102) as sock:
            sock.settimeout(10)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("echo mismatch")
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the VM and its temp directory are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    image, host = build_image(), detect_host()
    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        ser_path = Path(tmp) / "serial.sock"
        with vsock_vm(image, host, Path(tmp), memory_mib=512, extra=serial_args(ser_path)) as vm:
            port = vm.client.run("grep -l bench /sys/class/virtio-ports/*/name", check=True).stdout.decode()
            port = "/dev/" + port.strip().split("/")[-2]
            ser = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ser.connect(str(ser_path))
            ser.settimeout(120)
            vm.client.run(f"dd if=/dev/zero of={SRC} bs=1M count={args.mib} 2>/dev/null", check=True)
            results: dict[str, list[float]] = {k: [] for k in ("g2h_v", "g2h_s", "h2g_v", "h2g_s")}
            steps = (
                ("g2h_v", lambda: g2h_vsock(vm, args.mib)),
                ("g2h_s", lambda: g2h_serial(vm, port, ser, args.mib)),
                ("h2g_v", lambda: h2g_vsock(vm, args.mib)),
                ("h2g_s", lambda: h2g_serial(vm, port, ser, args.mib)),
            )
            for run in range(args.runs):  # interleaved, so drift in machine load hits both alike
                for key, step in steps:
                    results[key].append(step())
                    print(f"run {run + 1}/{args.runs} {key}: {results[key][-1]:.1f} MB/s", file=sys.stderr, flush=True)
            echo: Process = vm.client.start(["microvm-agent", "--echo", "5102"])
            connect_retry(vm, 5102).close()
            rtt_v = statistics.median(rtt_vsock(vm) for _ in range(args.runs))
            rtt_s = statistics.median(rtt_serial(vm, port, ser) for _ in range(args.runs))
            conn_v = statistics.median(connection_round_trip(vm) for _ in range(args.runs))
            echo.kill()
            echo.wait(timeout=30)
            ser.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"path: accel={host.accel}, vsock=userspace vhost-user backend (Python), QEMU {host.qemu_version}, "
          f"{args.mib} MiB x {args.runs} runs, medians")  # fmt: skip
    print(f"{'metric':<22}{'vsock':>12}{'virtio-serial':>16}{'ratio':>9}")
    rows = [
        ("guest->host MB/s", med["g2h_v"], med["g2h_s"]),
        ("host->guest MB/s", med["h2g_v"], med["h2g_s"]),
        ("1-byte round trip us", rtt_v, rtt_s),
    ]
    for name, v, s in rows:
        print(f"{name:<22}{v:>12.1f}{s:>16.1f}{v / s:>9.2f}")
    print(f"{'connection rtt us':<22}{conn_v:>12.1f}{'-':>16}{'-':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
