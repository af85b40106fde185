"""Boots the image with the userspace vsock backend and connects to the agent through it.

A test-side harness for the channel tests; the MicroVM lifecycle (issue 4) will own this.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pytest_microvm import GuestImage
from pytest_microvm.channel import UnixListener
from pytest_microvm.channel.userspace import UserspaceVsock
from pytest_microvm.client import AgentClient, connect_agent
from pytest_microvm.machine import HostReport, QemuProcess, qemu_argv
from pytest_microvm.machine.qemu import device_args

BOOT_TIMEOUT = 120.0


@dataclass
class VsockVM:
    qemu: QemuProcess
    vsock: UserspaceVsock
    agent_listener: UnixListener
    token: str
    client: AgentClient

    def reconnect(self, timeout: float = BOOT_TIMEOUT) -> AgentClient:
        """Wait for the current connection to drop (e.g. a reboot), then accept the next one."""
        deadline = time.monotonic() + timeout
        while self.client.connected:
            if time.monotonic() > deadline:
                raise TimeoutError("the agent connection did not drop")
            time.sleep(0.02)
        self.client.close()
        self.client = connect_agent(self.agent_listener, token=self.token, timeout=timeout)
        return self.client


@contextmanager
def vsock_vm(
    image: GuestImage,
    host: HostReport,
    workdir: Path,
    *,
    memory_mib: int = 256,
    no_reboot: bool = True,
    extra: Sequence[str] = (),
) -> Iterator[VsockVM]:
    assert host.qemu is not None
    token = secrets.token_hex(16)
    console = workdir / "console.log"
    with UserspaceVsock(workdir) as vsock, vsock.listen(1024) as listener:
        driver, props = vsock.device()
        argv = qemu_argv(
            image,
            qemu=host.qemu,
            accel=host.accel,
            console=console,
            memory_mib=memory_mib,
            cmdline=[f"microvm.token={token}"],
            shared_memory=True,
            no_reboot=no_reboot,
            extra=[*vsock.qemu_args(), *device_args(driver, **props), *extra],
        )
        with QemuProcess(argv, console, workdir / "qemu.stderr") as qemu:
            try:
                client = connect_agent(listener, token=token, timeout=BOOT_TIMEOUT)
            except Exception as exc:
                raise qemu.boot_error(f"the agent did not connect: {exc}\nbackend: {vsock.stderr_tail()}") from exc
            vm = VsockVM(qemu, vsock, listener, token, client)
            try:
                yield vm
            finally:
                vm.client.close()
