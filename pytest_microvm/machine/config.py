"""VMConfig: how to boot one VM, as plain data (what the marker, hooks and the CLI change).

Kept apart from :mod:`.vm` so that reading the options does not mean reading the
lifecycle. Validation happens at construction: a bad value is a ConfigError at once,
not a boot that fails later.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, cast

from pytest_microvm import arch as arches
from pytest_microvm.channel.kernel import DEFAULT_PORT
from pytest_microvm.errors import ConfigError
from pytest_microvm.image.kernel import MODULE_GROUPS

if TYPE_CHECKING:
    from pytest_microvm.image import GuestImage


@dataclass(frozen=True)
class Share:
    """A host directory the guest sees (virtio-9p); ``readonly`` shares refuse writes (EROFS)."""

    host: Path
    readonly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", Path(self.host))

    @classmethod
    def parse(cls, spec: str) -> tuple[str, Share]:
        """``HOST:GUEST[:ro|:rw]`` (the CLI's and ini's form) as (guest path, Share)."""
        parts = spec.split(":")
        readonly = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            readonly = parts.pop() == "ro"
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"share {spec!r}: write HOST:GUEST or HOST:GUEST:ro (paths without ':')")
        return parts[1], cls(Path(parts[0]), readonly)


ShareSpec = Union[str, "os.PathLike[str]", Share]
# The guest's own mounts over whatever root it has: its API file systems and fresh tmpfs
# on /tmp and /run. No share goes there, and in host-userland mode the host's files
# below them are hidden.
GUEST_OWN_PATHS = ("/proc", "/sys", "/dev", "/tmp", "/run")


def is_guest_own(path: str) -> bool:
    """True for a path on one of the guest's own mounts (GUEST_OWN_PATHS) or below one."""
    return any(path == p or path.startswith(p + "/") for p in GUEST_OWN_PATHS)


def _shares(shares: Mapping[str, ShareSpec]) -> dict[str, Share]:
    out: dict[str, Share] = {}
    for guest, spec in shares.items():
        share = spec if isinstance(spec, Share) else Share(Path(spec))
        if not isinstance(guest, str) or not guest.startswith("/"):
            raise ConfigError(f"share guest path {guest!r} is not absolute: write e.g. {{'/src': '{share.host}'}}")
        normal = posixpath.normpath(guest)
        if normal == "/" or normal in GUEST_OWN_PATHS or normal.startswith(("/proc/", "/sys/", "/dev/")):
            raise ConfigError(f"share guest path {guest}: the guest's own {normal} cannot be a share")
        if normal in out:
            raise ConfigError(f"share guest path {guest}: given twice")
        nested = [g for g in out if normal.startswith(g + "/") or g.startswith(normal + "/")]
        if nested:
            raise ConfigError(f"share guest paths {nested[0]} and {normal} nest: a share cannot hold another")
        if not share.host.is_dir():
            what = "does not exist" if not share.host.exists() else "is not a directory"
            raise ConfigError(f"share {guest}: host path {share.host} {what}")
        out[normal] = Share(share.host.resolve(), share.readonly)
    return out


def default_boot_timeout() -> float:
    """120 s, generous for TCG guests on a loaded 2-core CI runner; ``$MICROVM_BOOT_TIMEOUT``
    for slower hosts (scripts/nested sets it: a guest inside a TCG guest boots in minutes)."""
    raw = os.environ.get("MICROVM_BOOT_TIMEOUT", "")
    try:
        return float(raw) if raw else 120.0
    except ValueError:
        raise ConfigError(f"MICROVM_BOOT_TIMEOUT={raw!r}: not a number of seconds") from None


@dataclass(frozen=True)
class VMConfig:
    """How to boot one VM. Every field has a default that works on any Linux host."""

    memory_mib: int = 256
    vcpus: int = 1
    accel: str = "auto"  # auto | kvm | tcg
    vsock: str = "auto"  # auto | kernel | userspace
    kernel_cmdline: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    boot_timeout: float = field(default_factory=lambda: default_boot_timeout())
    image: GuestImage | None = None  # default: build (or find in the cache) the default image
    # vsock port the agent connects to (each VM has its own on the userspace path; on the
    # kernel path, where ports are host-wide, the agent's port is its guest CID instead).
    port: int = DEFAULT_PORT
    keep: bool = False  # boot detached so it can outlive this process, and leave it running at stop()
    workdir: Path | None = None  # where the per-VM directory goes (default: the system temp dir)
    # A NIC on QEMU's user-mode network (guest 10.0.2.15, NAT to the host's network), with
    # guest TCP port 22 forwarded from 127.0.0.1 (vm.ssh(transport="network")).
    network: bool = False
    # The guest's root (build_image builds it, cached): distro packages from the host's
    # apt, or a directory / tar / "host" (the host's / over 9p). Empty: busybox only.
    packages: tuple[str, ...] = ()
    rootfs: str | None = None
    # Host directories in the guest, {guest path: host path or Share(host, readonly=True)},
    # mounted over virtio-9p once the agent is up.
    shares: Mapping[str, ShareSpec] = field(default_factory=dict)
    # May this VM be a clone of a snapshot template (machine/snapshot/) rather than a
    # boot? Only where the configuration allows; False for a test that must see a boot.
    snapshot: bool = True
    # Module groups the agent loads besides those the root and shares need (image.kernel
    # MODULE_GROUPS), e.g. ("vhost",) for a guest that runs VMs of its own.
    modules: tuple[str, ...] = ()
    # The guest's architecture (arch.NAMES, or Debian's names): its image, QEMU and machine.
    # Default: the host's own. Another runs under TCG.
    arch: str = field(default_factory=arches.host_name)
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form, for hooks

    def __post_init__(self) -> None:
        if self.memory_mib < 64:
            raise ConfigError(f"memory_mib={self.memory_mib}: the guest needs at least 64 MiB")
        if not 1 <= self.vcpus <= 64:
            raise ConfigError(f"vcpus={self.vcpus}: between 1 and 64")
        if self.boot_timeout <= 0:
            raise ConfigError(f"boot_timeout={self.boot_timeout}: must be positive")
        if not 1 <= self.port < 0xFFFFFFFF:
            raise ConfigError(f"port={self.port}: not a vsock port")
        if isinstance(self.packages, str):  # a lone "python3" would be seven packages
            object.__setattr__(self, "packages", (self.packages,))
        object.__setattr__(self, "packages", tuple(self.packages))
        if self.rootfs is not None:
            object.__setattr__(self, "rootfs", os.fspath(self.rootfs))
        if self.packages and self.rootfs is not None:
            raise ConfigError("packages and rootfs do not combine: packages make a root of their own")
        object.__setattr__(self, "shares", _shares(self.shares))
        object.__setattr__(self, "arch", arches.get(self.arch).name)  # ConfigError lists the supported
        object.__setattr__(self, "modules", tuple(self.modules))
        unknown = sorted(set(self.modules) - set(MODULE_GROUPS))
        if unknown:
            raise ConfigError(f"modules={unknown}: known groups are {', '.join(sorted(MODULE_GROUPS))}")

    def share_list(self) -> list[tuple[str, Share]]:
        """The shares as (guest path, Share), validated and in a stable order."""
        shares = cast(Mapping[str, Share], self.shares)  # __post_init__ made every value a Share
        return sorted(shares.items(), key=lambda item: item[0])

    def with_(self, **changes: Any) -> VMConfig:
        """A copy with some fields changed (the marker and hooks use this)."""
        return replace(self, **changes)
