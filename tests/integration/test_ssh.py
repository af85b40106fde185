"""SSH through paramiko into a real guest (dropbear, the image's ssh feature), over vsock and
over QEMU's user-mode network."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from pytest_microvm import GuestImage, MicroVM, MicroVMError, VMConfig, build_image
from tests.integration.paths import path_params

# Generous: under TCG inside TCG (the kernel path's CI stage) a key exchange in the guest
# takes seconds, and longer on a loaded host. A working connection is never slowed by it.
T = 180.0


@pytest.fixture(scope="module")
def ssh_image(microvm_image: GuestImage, session_kernel: str | None) -> GuestImage:
    return build_image(kernel=session_kernel, features=("ssh",), cache=microvm_image.directory.parents[1])


@pytest.fixture(scope="module", params=path_params())
def vm(request: pytest.FixtureRequest, ssh_image: GuestImage) -> Iterator[MicroVM]:
    """One VM per vsock path: SSH over vsock rides on vm.connect, which each path does its own way."""
    with MicroVM(VMConfig(image=ssh_image, network=True, vsock=request.param), name=request.param) as machine:
        assert machine.choice is not None and machine.choice.vsock == request.param
        # The first client starts dropbear and makes this process's key; under TCG inside
        # TCG (the kernel path's CI stage) that alone can take longer than a test's 30 s.
        machine.ssh(timeout=300).close()
        yield machine


@pytest.mark.parametrize("transport", ["vsock", "network"])
def test_exec_over_ssh(vm: MicroVM, transport: str) -> None:
    client = vm.ssh(transport=transport, timeout=T)
    _stdin, stdout, stderr = client.exec_command("echo out; echo err >&2; exit 3", timeout=T)
    assert stdout.read() == b"out\n" and stderr.read() == b"err\n"
    assert stdout.channel.recv_exit_status() == 3


@pytest.mark.parametrize("transport", ["vsock", "network"])
def test_sftp_round_trip(vm: MicroVM, tmp_path: Path, transport: str) -> None:
    data = os.urandom(1024 * 1024 + 5)
    (tmp_path / "up").write_bytes(data)
    sftp = vm.ssh(transport=transport, timeout=T).open_sftp()
    sftp.put(str(tmp_path / "up"), "/tmp/up")
    assert vm.run(["sha256sum", "/tmp/up"]).stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    sftp.get("/tmp/up", str(tmp_path / "down"))
    assert (tmp_path / "down").read_bytes() == data
    sftp.close()


def test_several_clients_at_once(vm: MicroVM) -> None:
    clients = [vm.ssh(timeout=T), vm.ssh(transport="network", timeout=T), vm.ssh(timeout=T)]
    outs = [c.exec_command(f"echo {i}", timeout=T)[1].read() for i, c in enumerate(clients)]
    assert outs == [b"0\n", b"1\n", b"2\n"]


def test_network_ssh_is_a_plain_tcp_connection_from_the_guests_view(vm: MicroVM) -> None:
    # Over the network the client comes from QEMU's gateway; over vsock, from loopback.
    _in, out, _err = vm.ssh(transport="network", timeout=T).exec_command("echo $SSH_CLIENT", timeout=T)
    assert out.read().split()[0] == b"10.0.2.2"
    _in, out, _err = vm.ssh(timeout=T).exec_command("echo $SSH_CLIENT", timeout=T)
    assert out.read().split()[0] == b"127.0.0.1"


def test_ssh_over_the_network_needs_a_vm_with_one(ssh_image: GuestImage) -> None:
    with MicroVM(VMConfig(image=ssh_image)) as no_net, pytest.raises(MicroVMError, match="network=True"):
        no_net.ssh(transport="network")


def test_a_wrong_host_key_is_refused(vm: MicroVM, monkeypatch: pytest.MonkeyPatch) -> None:
    assert vm._ssh is not None
    monkeypatch.setattr(vm._ssh, "host_key", paramiko.Ed25519Key(data=bytes.fromhex(
        "0000000b7373682d656432353531390000002000" + "11" * 31
    )))  # fmt: skip
    with pytest.raises(paramiko.SSHException):
        vm.ssh(timeout=20)
    with pytest.raises(paramiko.SSHException):
        vm.ssh(timeout=20, transport="network")


def test_an_image_without_ssh_says_how_to_get_it(microvm_image: GuestImage) -> None:
    with MicroVM(VMConfig(image=microvm_image)) as plain, pytest.raises(MicroVMError, match="features=\\('ssh',\\)"):
        plain.ssh()
