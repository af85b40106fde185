"""Which apt the image builder asks, for one guest architecture.

For the host's own architecture: the host's apt as it is (its sources and its package
lists, which `apt-get update` keeps fresh). For another (an arm64 guest on an x86_64
host): the same sources, with ``APT::Architecture`` set to the guest's, and package lists
of its own in ``cache/apt/<debian arch>/lists``, fetched by ``apt-get update`` without
root the first time and again whenever the host's own lists change (the user ran
``apt-get update``). So Debian's kernel, busybox-static, dropbear and ``packages=``
closures come the same way for either, each keyed by architecture in the cache.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from pytest_microvm import _logging
from pytest_microvm.arch import Arch
from pytest_microvm.errors import ImageError

log = _logging.logger(__name__)
HOST_LISTS = Path("/var/lib/apt/lists")  # rewritten by `apt-get update`, and only then


def _stamp(lists: Path) -> str | None:
    """Names, sizes and times of the Packages files in ``lists``: None without any."""
    parts = []
    for path in sorted(lists.glob("*Packages*")):
        try:
            st = path.stat()
        except OSError:  # being replaced by `apt-get update` right now
            return None
        parts.append(f"{path.name}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts) or None


class Apt:
    """apt for ``arch``: the options every apt-get and apt-cache call takes, and the lists."""

    def __init__(self, arch: Arch, cache: Path) -> None:
        self.arch = arch
        self.native = arch.native
        self.cache = cache
        self.lists = HOST_LISTS if self.native else cache / "apt" / arch.debian / "lists"
        # Where answers read from the lists are remembered (one directory per architecture).
        self.memo = cache / "apt" if self.native else cache / "apt" / arch.debian

    def options(self) -> list[str]:
        """Options for apt-get and apt-cache: none for the host's own architecture."""
        if self.native:
            return []
        opts = [
            "-o", f"APT::Architecture={self.arch.debian}",
            "-o", f"APT::Architectures::={self.arch.debian}",  # ::= replaces the host's list
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", "Dir::Cache::pkgcache=",  # never the host's binary caches, built from its lists
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Debug::NoLocking=1",  # the lists are ours; the host's locks need root
        ]  # fmt: skip
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]  # _apt could not write into the user's cache
        return opts

    def stamp(self) -> str | None:
        """What answers read from the lists depend on; None when there are none."""
        own = _stamp(self.lists)
        return None if own is None else f"{self.arch.debian}|{own}"

    def has_lists(self) -> bool:
        return _stamp(self.lists) is not None

    def ensure_lists(self, progress: Callable[[str], None]) -> None:
        """Fetch this architecture's package lists if it has none, or if the host's changed
        since they were fetched. Nothing to do for the host's own architecture."""
        if self.native:
            return
        host = _stamp(HOST_LISTS) or "no host lists"
        marker = self.lists.parent / "host-lists.stamp"
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lists) + ".lock"):  # workers building at once update once
            if self.has_lists() and marker.is_file() and marker.read_text() == host:
                return
            progress(f"apt-get update for {self.arch.debian} (the host's sources, package lists of our own)")
            env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
            argv = ["apt-get", "-qq", *self.options(), "-o", f"Dir::State::status={os.devnull}", "update"]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            except FileNotFoundError:
                raise ImageError(f"{self.arch.name} guests need apt-get (Debian/Ubuntu) for their packages") from None
            if proc.returncode != 0 and self.has_lists():
                # Offline, or a mirror down: the lists fetched before still name real packages
                # (and what is cached was built from them).
                log.warning(
                    "apt-get update for %s failed (%s); using its package lists from before",
                    self.arch.debian, proc.stderr.strip()[-300:],
                )  # fmt: skip
                # Not again at every build (an offline host would wait on the network each
                # time): again when the host's own lists change.
                marker.write_text(host)
                return
            if proc.returncode != 0 or not self.has_lists():
                raise ImageError(
                    f"apt-get update for {self.arch.debian} failed ({proc.returncode}): "
                    f"{proc.stderr.strip()[-800:] or 'no package lists came'}"
                )
            marker.write_text(host)
