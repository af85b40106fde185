"""The integration suite on one machine vs split in two shards (pytest-split), in one run.

    .venv/bin/python bench/shards.py [--runs 1] [-- PYTEST ARGS]   (default: -m integration -n 2)

What two CI runners would see: the suite is run whole once with ``--store-durations``
(recorded durations are what pytest-split balances by), then each round runs the whole
suite and its two shards (``--splits 2 --group 1|2``) one after the other on this machine.
The figure of interest is the slower shard's wall time against the whole run's: with two
runners the sharded suite takes about the slower shard (plus each runner's setup, which
this machine does not pay twice: one image cache serves both here). Running the two shards
at once on one machine would only measure the machine's cores, so they run in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_microvm.machine import choose, detect_host

ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    took = time.monotonic() - start
    tail = proc.stdout.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    if proc.returncode not in (0, 1):  # 1: some test failed; the timing still stands
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {tail[0]}")
    say(f"  {took:7.1f}s  {' '.join(argv[3:])}  -> {tail[0]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("pytest_args", nargs="*", default=["-m", "integration", "-n", "2"])
    args = ap.parse_args()
    host = detect_host()
    choice = choose(host, "auto", "auto")
    say(f"path: accel={choice.accel}, vsock={choice.vsock}; {os.cpu_count()} cores")
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args.pytest_args]
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp:
        durations = f"--durations-path={Path(tmp) / 'durations.json'}"
        say("recording durations (a whole run)")
        timed([*pytest, durations, "--store-durations"])
        whole: list[float] = []
        shard: dict[int, list[float]] = {1: [], 2: []}
        for i in range(args.runs):
            say(f"round {i + 1}/{args.runs}")
            whole.append(timed([*pytest, durations]))
            for group in (1, 2):
                shard[group].append(timed([*pytest, durations, "--splits", "2", "--group", str(group)]))
    w = statistics.median(whole)
    s1, s2 = statistics.median(shard[1]), statistics.median(shard[2])
    print(f"path: accel={choice.accel}, vsock={choice.vsock}; pytest {' '.join(args.pytest_args)}; runs {args.runs}")
    print(f"one machine:         {w:7.1f} s")
    print(f"shard 1 / shard 2:   {s1:7.1f} s / {s2:.1f} s")
    print(f"two runners (slower shard) vs one machine: {max(s1, s2):.1f} vs {w:.1f} s ({max(s1, s2) / w:.2f}x)")
    print(f"shard balance (slower / faster): {max(s1, s2) / min(s1, s2):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
