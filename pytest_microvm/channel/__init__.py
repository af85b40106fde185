"""How bytes get between host and agent. The channel knows nothing about commands.

Each flavour gives the host a listener the agent connects to and returns connected
stream sockets; :mod:`pytest_microvm.client` speaks the protocol on top.

- :mod:`.unix`: a Unix socket (the agent on the host in tests; the userspace backend's
  ``<uds>_<port>``), and the accept-then-handshake step
- :mod:`.kernel`: AF_VSOCK on CID 2, for hosts with /dev/vhost-vsock
- :mod:`.userspace`: starts the vhost-user-vsock backend (:mod:`.vhost_user`) for a VM

Imported lazily: the backend process imports :mod:`.vhost_user` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["UnixListener", "connect_agent"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pytest_microvm.channel import unix

        return getattr(unix, name)
    raise AttributeError(f"module 'pytest_microvm.channel' has no attribute {name!r}")


if TYPE_CHECKING:
    from pytest_microvm.channel.unix import UnixListener, connect_agent
