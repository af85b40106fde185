"""pytest-microvm: run integration tests inside throw-away QEMU microVMs.

The public API; the modules behind it are private and may change. Names are imported
on first use (PEP 562), so that a process needing one corner of the package — the
vsock backend, started once per VM and waited for at boot — does not pay for all of it.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing is a tenth of `microvm --help`

__version__ = "0.1.0"

_EXPORTS = {
    "AgentClient": "pytest_microvm.client",
    "Process": "pytest_microvm.client",
    "CommandResult": "pytest_microvm.result",
    "GuestImage": "pytest_microvm.image",
    "build_agent": "pytest_microvm.image",
    "build_image": "pytest_microvm.image",
    "MicroVM": "pytest_microvm.machine",
    "Runstate": "pytest_microvm.machine",
    "VMConfig": "pytest_microvm.machine",
    "Share": "pytest_microvm.machine",
    "boot": "pytest_microvm.machine",
    "AgentError": "pytest_microvm.errors",
    "BootError": "pytest_microvm.errors",
    "CommandError": "pytest_microvm.errors",
    "CommandTimeout": "pytest_microvm.errors",
    "ConfigError": "pytest_microvm.errors",
    "ConnectionLost": "pytest_microvm.errors",
    "GuestError": "pytest_microvm.errors",
    "HandshakeError": "pytest_microvm.errors",
    "ImageError": "pytest_microvm.errors",
    "MicroVMError": "pytest_microvm.errors",
    "ProtocolError": "pytest_microvm.errors",
}

__all__ = [
    "AgentClient",
    "AgentError",
    "BootError",
    "CommandError",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "ConnectionLost",
    "GuestError",
    "GuestImage",
    "HandshakeError",
    "ImageError",
    "MicroVM",
    "MicroVMError",
    "Process",
    "ProtocolError",
    "Runstate",
    "Share",
    "VMConfig",
    "__version__",
    "boot",
    "build_agent",
    "build_image",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_microvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


if TYPE_CHECKING:
    from typing import Any

    from pytest_microvm.client import AgentClient, Process
    from pytest_microvm.errors import (
        AgentError,
        BootError,
        CommandError,
        CommandTimeout,
        ConfigError,
        ConnectionLost,
        GuestError,
        HandshakeError,
        ImageError,
        MicroVMError,
        ProtocolError,
    )
    from pytest_microvm.image import GuestImage, build_agent, build_image
    from pytest_microvm.machine import MicroVM, Runstate, Share, VMConfig, boot
    from pytest_microvm.result import CommandResult
