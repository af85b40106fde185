"""How bytes get between host and agent. The channel knows nothing about commands.

Each flavour gives the host a listener the agent connects to and returns connected
stream sockets; :mod:`pytest_microvm.client` speaks the protocol on top.

- :class:`UnixListener`: the agent runs on the host (tests), or a userspace vsock
  backend forwards guest connections to ``<uds>_<port>``.
"""

from pytest_microvm.channel.unix import UnixListener, connect_agent

__all__ = ["UnixListener", "connect_agent"]
