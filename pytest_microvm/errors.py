"""The exception tree of pytest-microvm: every error the package raises on purpose.

    MicroVMError
    ├── ProtocolError            a peer broke docs/protocol.md (malformed frame, bad handshake)
    │   ├── HandshakeError       wrong protocol version or token in HELLO
    │   └── ConnectionLost       the stream closed while a request was waiting
    ├── AgentError               the agent refused or could not start a job (an ERROR frame)
    ├── CommandError             ``check=True`` and the command did not exit 0
    ├── CommandTimeout           the host gave up waiting (also a ``TimeoutError``)
    ├── GuestError               the guest or its QEMU died (carries console tail, QEMU stderr)
    │   └── BootError            the guest did not become ready
    ├── ConfigError              a setting this host cannot honour (e.g. forcing KVM without KVM)
    └── ImageError               the guest image could not be built

Errors carry the data a user needs to act (the result, the errno, the frame) as
attributes, and chain the underlying cause.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_microvm.result import CommandResult


class MicroVMError(Exception):
    """Root of every error pytest-microvm raises on purpose."""


class ProtocolError(MicroVMError):
    """A peer sent something docs/protocol.md does not allow."""


class HandshakeError(ProtocolError):
    """HELLO carried a protocol version or token the host does not accept."""


class ConnectionLost(ProtocolError):
    """The connection to the agent closed while a request was waiting for it."""


class AgentError(MicroVMError):
    """The agent answered a job with ERROR: it could not start or finish it.

    ``code`` is the guest's errno (e.g. 2 for a program that does not exist).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"agent: {message} (errno {code})")
        self.code = code
        self.message = message


class CommandError(MicroVMError):
    """A command run with ``check=True`` failed; ``result`` says how."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"command {result.argv!r} failed: {result.describe()}")
        self.result = result


class CommandTimeout(MicroVMError, TimeoutError):
    """The host stopped waiting for the agent (the agent itself did not answer in time)."""


class ImageError(MicroVMError):
    """The guest image could not be built; the message says which step and why."""


class ConfigError(MicroVMError):
    """A configuration this host cannot run; the message says what to change."""


class GuestError(MicroVMError):
    """The guest died or misbehaved (kernel panic, QEMU exit); the console tail says why."""

    def __init__(self, message: str, *, console_tail: str = "", qemu_stderr: str = "") -> None:
        parts = [message]
        if qemu_stderr.strip():
            parts.append("QEMU stderr:\n" + qemu_stderr.rstrip())
        if console_tail.strip():
            parts.append("console (last lines):\n" + console_tail.rstrip())
        super().__init__("\n".join(parts))
        self.console_tail = console_tail
        self.qemu_stderr = qemu_stderr


class BootError(GuestError):
    """The guest did not become ready; the console tail and QEMU's stderr say why."""
