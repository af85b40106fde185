"""VMConfig: how to boot one VM, as plain data (what the marker, hooks and the CLI change).

Kept apart from :mod:`.vm` so that reading the options does not mean reading the
lifecycle. Validation happens at construction: a bad value is a ConfigError at once,
not a boot that fails later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_microvm.channel.kernel import DEFAULT_PORT
from pytest_microvm.errors import ConfigError
from pytest_microvm.image import GuestImage


@dataclass(frozen=True)
class VMConfig:
    """How to boot one VM. Every field has a default that works on any Linux host."""

    memory_mib: int = 256
    vcpus: int = 1
    accel: str = "auto"  # auto | kvm | tcg
    vsock: str = "auto"  # auto | kernel | userspace
    kernel_cmdline: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    boot_timeout: float = 120.0  # generous: TCG guests on a loaded 2-core CI runner
    image: GuestImage | None = None  # default: build (or find in the cache) the default image
    port: int = DEFAULT_PORT  # vsock port the agent connects to
    keep: bool = False  # boot detached so it can outlive this process, and leave it running at stop()
    workdir: Path | None = None  # where the per-VM directory goes (default: the system temp dir)
    # A NIC on QEMU's user-mode network (guest 10.0.2.15, NAT to the host's network), with
    # guest TCP port 22 forwarded from 127.0.0.1 (vm.ssh(transport="network")).
    network: bool = False
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

    def with_(self, **changes: Any) -> VMConfig:
        """A copy with some fields changed (the marker and hooks use this)."""
        return replace(self, **changes)
