"""Where built artifacts live: one cache directory, overridable, never inside the repo.

Resolved at call time (not import time) so tests and users can point it elsewhere:
``$MICROVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-microvm``, else
``~/.cache/pytest-microvm``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "MICROVM_CACHE_DIR"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root, created if missing."""
    if override is not None:
        root = Path(override)
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-microvm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_build(final: Path, build: Callable[[Path], None]) -> bool:
    """Make the directory ``final`` exist by calling ``build(staging_dir)`` once across processes.

    The build fills a fresh staging directory beside ``final`` that is renamed into place
    under a ``filelock``, so a reader never sees half a build and a failed build leaves
    nothing behind. Returns True if this call built it, False if it was already there
    (or another process built it while this one waited for the lock).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # here: reading the cache's path needs no lock

    with FileLock(str(final) + ".lock"):
        if final.exists():
            return False
        # Under the lock a staging directory of this entry can only be a dead builder's
        # (killed halfway): never used, but possibly large, so it goes.
        for stale in final.parent.glob(f".{final.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it 0700; a shared cache must stay readable
        try:
            build(staging)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def remembered(memo: Path, stamp: str | None, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON value, kept in the file ``memo`` for as long as ``stamp`` (what
    the answer depends on, e.g. the apt lists' names, sizes and times) stays the same.

    For answers that are slow to get and rarely change (asking apt costs seconds, paid on
    every image lookup otherwise). A ``stamp`` of None means nothing to key on: compute,
    remember nothing.
    """
    if stamp is not None:
        try:
            known = json.loads(memo.read_text())
            if known.get("stamp") == stamp:
                return known["value"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    value = compute()
    if stamp is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "value": value}))
        os.replace(tmp, memo)  # atomic: concurrent writers leave one whole file
    return value
