"""pytest-microvm: run integration tests inside throw-away QEMU microVMs.

The public API; the modules behind it are private and may change.
"""

import logging

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
from pytest_microvm.machine import MicroVM, Runstate, VMConfig, boot
from pytest_microvm.result import CommandResult

__version__ = "0.1.0"

# A library does not configure logging: the application (or pytest) decides what shows.
logging.getLogger(__name__).addHandler(logging.NullHandler())

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
    "VMConfig",
    "__version__",
    "boot",
    "build_agent",
    "build_image",
]
