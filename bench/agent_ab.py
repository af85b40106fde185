"""Exec round trip of the agent at a git revision beside the agent in the working tree.

    .venv/bin/python bench/agent_ab.py --base REV [--rounds 3] [--execs 100] [--kernel debian|source]

For changes to guest-image/agent/agent.c: both agents are built into images that differ
in nothing else, and the rounds interleave (base VM, new VM, base VM, ...), each VM
timing ``vm.run(["true"])`` after a warm-up. Prints the medians and the ratio.
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
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm import GuestImage, MicroVM, VMConfig, build_image
from pytest_microvm.image import builder
from pytest_microvm.machine import choose, detect_host

REPO = Path(__file__).resolve().parents[1]


def image_with_agent(source_dir: Path, kernel: str) -> GuestImage:
    with mock.patch.object(builder, "agent_source_dir", lambda: source_dir):
        return build_image(kernel=kernel)


def exec_times(image: GuestImage, execs: int) -> list[float]:
    with MicroVM(VMConfig(image=image)) as vm:
        for _ in range(20):
            vm.run(["true"])  # warm up: TCG translates the paths once
        times = []
        for _ in range(execs):
            start = time.perf_counter()
            vm.run(["true"])
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision of the agent to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--execs", type=int, default=100)
    ap.add_argument("--kernel", default="debian", choices=["debian", "source"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp)
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{args.base}:guest-image/agent/agent.c"],
            capture_output=True,
            check=True,
        ).stdout
        (base_dir / "agent.c").write_bytes(source)
        base = image_with_agent(base_dir, args.kernel)
    new = image_with_agent(REPO / "guest-image" / "agent", args.kernel)
    base_t: list[float] = []
    new_t: list[float] = []
    for i in range(args.rounds):
        base_t += exec_times(base, args.execs)
        new_t += exec_times(new, args.execs)
        print(f"round {i + 1}/{args.rounds}: base {statistics.median(base_t) * 1e3:.1f} ms, "
              f"new {statistics.median(new_t) * 1e3:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    mb, mn = statistics.median(base_t) * 1e3, statistics.median(new_t) * 1e3
    print(f"path: {choose(detect_host()).why}; kernel {new.kernel_release} ({args.kernel})")
    print(f"exec round trip (true)  base {args.base}: {mb:.1f} ms   working tree: {mn:.1f} ms   ratio {mn / mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
