"""SSH into a guest through paramiko, over vsock or over QEMU's user-mode network.

For tests that need SSH semantics (SFTP, an SSH client library under test) and as the
benchmark baseline. The image must have the ``ssh`` feature (dropbear). The first call
puts a fresh client key into the guest's authorized_keys and starts dropbear; every
client is a new connection, and the host key is checked against the one the image
builder generated.

Two ways in:
- ``vsock`` (default; no network device): ``microvm-agent --forward 22 22`` relays vsock
  port 22 to TCP 127.0.0.1:22 in the guest. (dropbear's inetd mode cannot serve a vsock
  socket: it resolves the peer's address, which for AF_VSOCK fails.)
- ``network`` (``VMConfig(network=True)``): plain TCP to the host port QEMU forwards to
  the guest's port 22, as SSH to any machine would go.

This module needs only what :class:`Guest` lists (a running guest's commands, files and
vsock connections), so it does not import :mod:`.vm`; vm.py imports it, one way.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import paramiko

from pytest_microvm._wait import until_deadline
from pytest_microvm.errors import ConnectionLost, MicroVMError
from pytest_microvm.image.sources import SSH_HOST_KEY

if TYPE_CHECKING:
    from pytest_microvm.client import Command, Process
    from pytest_microvm.machine.config import VMConfig
    from pytest_microvm.result import CommandResult


class Guest(Protocol):
    """What GuestSsh needs of a running VM (MicroVM is one)."""

    @property
    def config(self) -> VMConfig: ...

    @property
    def forwarded_ports(self) -> Mapping[int, int]: ...

    def run(self, cmd: Command, *, check: bool = False) -> CommandResult: ...

    def write_file(self, remote: str, data: bytes, *, mode: int = 0o644) -> None: ...

    def start_process(self, cmd: Command) -> Process: ...

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket: ...


SSH_PORT = 22
TRANSPORTS = ("vsock", "network")
_key_lock = threading.Lock()
_client_key: paramiko.RSAKey | None = None


def _key() -> paramiko.RSAKey:
    """One client key per process: generating RSA keys costs a noticeable fraction of a second."""
    global _client_key
    with _key_lock:
        if _client_key is None:
            _client_key = paramiko.RSAKey.generate(2048)
        return _client_key


class GuestSsh:
    """The SSH side of one VM: the server job in the guest and the clients made to it."""

    def __init__(self, vm: Guest) -> None:
        image = vm.config.image
        if image is None or "ssh" not in image.features or not image.ssh_host_key:
            raise MicroVMError(
                "this VM's image has no SSH server: build it with build_image(features=('ssh',)) "
                "(pytest: --microvm-features ssh)"
            )
        self.vm = vm
        kind, b64 = image.ssh_host_key.split()[:2]
        if kind != "ssh-ed25519":
            raise MicroVMError(f"unexpected host key type {kind}")
        self.host_key = paramiko.Ed25519Key(data=base64.b64decode(b64))
        self._server: Process | None = None
        self.clients: list[paramiko.SSHClient] = []

    def _start_server(self) -> None:
        key = _key()
        self.vm.run("mkdir -p /root/.ssh && chmod 700 /root/.ssh", check=True)
        self.vm.write_file("/root/.ssh/authorized_keys", f"{key.get_name()} {key.get_base64()}\n".encode(), mode=0o600)
        # -s: no passwords; -r: the image's key; -p: loopback only unless the VM has a
        # network (vsock reaches loopback through the relay below).
        listen = str(SSH_PORT) if self.vm.config.network else f"127.0.0.1:{SSH_PORT}"
        self.vm.run(f"/usr/sbin/dropbear -s -r {SSH_HOST_KEY} -p {listen} -P /run/dropbear.pid", check=True)
        self._server = self.vm.start_process(f"exec microvm-agent --forward {SSH_PORT} {SSH_PORT} >/dev/null 2>&1")

    def _socket(self, transport: str, deadline: float) -> socket.socket:
        """A connected stream to dropbear: the agent's vsock relay, or QEMU's forwarded port."""
        host_port = self.vm.forwarded_ports.get(SSH_PORT, 0)
        if transport == "network" and not host_port:
            raise MicroVMError("this VM has no network: boot it with VMConfig(network=True) for SSH over the network")

        def attempt() -> socket.socket:
            if transport == "network":
                return socket.create_connection(("127.0.0.1", host_port), max(1.0, deadline - time.monotonic()))
            return self.vm.connect(SSH_PORT, timeout=max(1.0, deadline - time.monotonic()))

        # The server's listener comes up a moment after it starts: refused until then.
        return until_deadline(deadline, (ConnectionLost, ConnectionRefusedError, ConnectionResetError), attempt)

    def connect(self, timeout: float = 30.0, transport: str = "vsock") -> paramiko.SSHClient:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r}: one of {', '.join(TRANSPORTS)}")
        if self._server is None:
            self._start_server()
        sock = self._socket(transport, time.monotonic() + timeout)
        client = paramiko.SSHClient()
        client.get_host_keys().add("microvm", "ssh-ed25519", self.host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                "microvm",
                username="root",
                pkey=_key(),
                sock=sock,
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException:
            client.close()
            sock.close()
            raise
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()
