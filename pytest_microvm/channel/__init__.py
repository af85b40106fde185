"""How bytes get between host and guest. The channel knows nothing about commands.

Every vsock flavour is one :class:`~.base.Channel`: the device QEMU gets, listeners for
the guest's connections to the host, and connections to guest ports.
:mod:`pytest_microvm.client` speaks the agent protocol on top.

- :mod:`.base`: the Channel and Listener interface both flavours keep alike
- :mod:`.kernel`: QEMU's vhost-vsock-pci and AF_VSOCK on the host (/dev/vhost-vsock)
- :mod:`.userspace`: the vhost-user-vsock backend process (:mod:`.vhost_user`) and its Unix sockets
- :mod:`.allocation`: guest CIDs for the kernel flavour (global on a host)
- :mod:`.unix`: a Unix-socket listener (the userspace flavour's, and the agent on the host in tests)

Imported lazily: the backend process imports :mod:`.vhost_user` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["Channel", "Listener", "UnixListener", "open_channel", "reopen_listener"]


def open_channel(flavour: str, sockdir: Path, *, die_with_parent: bool = True) -> Channel:
    """The channel of flavour ``flavour`` ("kernel" or "userspace"), not started yet.

    ``sockdir``: where a flavour's Unix sockets go; ``die_with_parent``: a backend
    process ends with this one (False for a VM kept running after the test).
    """
    from pytest_microvm.channel.kernel import KernelVsock
    from pytest_microvm.channel.userspace import UserspaceVsock

    if flavour == "kernel":
        return KernelVsock()
    if flavour == "userspace":
        return UserspaceVsock(sockdir, die_with_parent=die_with_parent)
    raise ValueError(f"unknown vsock flavour {flavour!r}")


def reopen_listener(state: dict[str, Any], port: int) -> Listener:
    """The agent's listener again, from a kept VM's saved :meth:`Channel.state` (``microvm attach``).

    The agent lost its host when the test process exited and keeps reconnecting to the
    same port, so the listener is made on exactly that port.
    """
    from pytest_microvm.channel.kernel import KernelVsockListener
    from pytest_microvm.channel.unix import UnixListener
    from pytest_microvm.errors import MicroVMError

    if state.get("uds"):
        path = Path(f"{state['uds']}_{port}")
        path.unlink(missing_ok=True)  # the old listener's socket file is stale
        return UnixListener(path, port=port)
    if "guest_cid" not in state:
        raise MicroVMError("the VM's state names no vsock channel (kept by an older pytest-microvm?): microvm stop it")
    return KernelVsockListener(int(state["guest_cid"]), port)


def __getattr__(name: str) -> Any:
    if name == "UnixListener":
        from pytest_microvm.channel import unix

        return getattr(unix, name)
    if name in ("Channel", "Listener"):
        from pytest_microvm.channel import base

        return getattr(base, name)
    raise AttributeError(f"module 'pytest_microvm.channel' has no attribute {name!r}")


if TYPE_CHECKING:
    from pytest_microvm.channel.base import Channel, Listener
    from pytest_microvm.channel.unix import UnixListener
