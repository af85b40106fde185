"""Guest CIDs: global on a host, so allocated, never hard-coded.

Only the kernel vhost-vsock path needs this (the userspace backend gives each VM its own
Unix sockets). A CID is claimed by a lock file held for the VM's lifetime, so processes
of ours (xdist workers) never pick the same one; another program may still hold it,
which QEMU reports at start ("Address already in use"): the caller then retries with a
new pick (tenacity).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

FIRST_CID = 3  # 0, 1 and 2 are reserved; 0xffffffff means "any"
LAST_CID = 0xFFFFFFFE


def lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"pytest-microvm-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class Claim:
    """A held lock on one number (a CID, or a port); release it when the VM stops."""

    def __init__(self, kind: str, value: int, lock: FileLock) -> None:
        self.kind = kind
        self.value = value
        self._lock = lock

    def release(self) -> None:
        self._lock.release()
        Path(self._lock.lock_file).unlink(missing_ok=True)


def claim(kind: str, value: int, directory: Path | None = None) -> Claim | None:
    """Claim ``value`` if no other process of ours holds it."""
    lock = FileLock(str((directory or lock_dir()) / f"{kind}-{value}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return Claim(kind, value, lock)


def claim_random(kind: str, low: int, high: int, rng: random.Random | None = None,
                 directory: Path | None = None, attempts: int = 64) -> Claim:  # fmt: skip
    """Claim a random free value in [low, high]."""
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        got = claim(kind, rng.randint(low, high), directory)
        if got is not None:
            return got
    raise OSError(f"no free {kind} found in {attempts} random picks")
