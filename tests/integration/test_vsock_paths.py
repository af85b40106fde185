"""Both vsock paths, one test code: everything a test does on one path it does on the other.

Every test that takes the ``vm`` fixture runs on the userspace backend and on kernel
vhost-vsock, each on a booted VM and on a snapshot clone (the fixture's parameter); the
last test is the kernel path's alone (its listeners' CID check). The kernel path needs a
usable /dev/vhost-vsock (KVM is not needed): this machine has none, so CI runs those
cases inside a nested guest that has it (``scripts/nested``, the ``kernel_vsock``
marker); here they skip and say why.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pytest_microvm import BootError, CommandTimeout, ConnectionLost, GuestImage, MicroVM, VMConfig
from pytest_microvm.machine.snapshot.policy import Templates
from tests.integration.paths import needs_kernel_path, path_launch_params


@pytest.fixture(scope="module", params=path_launch_params())
def vm(request: pytest.FixtureRequest, microvm_image: GuestImage) -> Iterator[MicroVM]:
    path, how = request.param
    config = VMConfig(image=microvm_image, vsock=path, snapshot=how == "clone")
    machine = Templates().start(config, name=f"{path}-{how}")
    try:
        assert machine.choice is not None and machine.choice.vsock == path
        assert machine.cloned == (how == "clone"), "a clone was asked for, and this host can make one"
        yield machine
    finally:
        machine.stop()


def connect_when_listening(vm: MicroVM, port: int, timeout: float = 60.0) -> socket.socket:
    """vm.connect, retried while the guest's listener is not up yet (the guest refuses)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return vm.connect(port)
        except ConnectionLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def recv_all(sock: socket.socket, timeout: float = 60.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_the_agent_runs_commands(vm: MicroVM) -> None:
    r = vm.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)


def test_connect_reaches_a_guest_port(vm: MicroVM) -> None:
    echo = vm.start_process(["microvm-agent", "--echo", "5200"])
    try:
        with connect_when_listening(vm, 5200) as sock:
            sock.sendall(b"ping over vsock")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"ping over vsock"
    finally:
        echo.kill()


def test_connect_to_a_port_nobody_listens_on_is_refused_at_once(vm: MicroVM) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match="refused a connection to vsock port 6999"):
        vm.connect(6999, timeout=30)
    assert time.monotonic() - started < 10  # a refusal, not the timeout


def test_listen_receives_the_guests_connection(vm: MicroVM) -> None:
    with vm.listen(5300) as listener:
        sent = vm.start_process(f"echo hello host | microvm-agent --connect 2:{listener.port}")
        with listener.accept(timeout=60) as conn:
            assert recv_all(conn) == b"hello host\n"
        assert sent.wait(timeout=60).exit_code == 0


def test_listen_moves_off_a_port_that_is_taken(vm: MicroVM) -> None:
    # On the kernel path host vsock ports are host-wide: another worker's VM may hold it.
    with vm.listen(5301) as first, vm.listen(5301) as second:
        assert first.port == 5301 and second.port != 5301
        sent = vm.start_process(f"echo second | microvm-agent --connect 2:{second.port}")
        with second.accept(timeout=60) as conn:
            assert recv_all(conn) == b"second\n"
        sent.wait(timeout=60)
        with pytest.raises(CommandTimeout):
            first.accept(timeout=0.5)  # nobody came to the port that was asked for


def test_a_listener_nobody_connects_to_times_out_clearly(vm: MicroVM) -> None:
    with vm.listen() as listener, pytest.raises(CommandTimeout, match=f"port {listener.port} within 0.5s"):
        listener.accept(timeout=0.5)


def test_tcp_reaches_a_guest_service(vm: MicroVM) -> None:
    vm.start_process("exec nc -ll -p 7000 -e echo served")
    with vm.tcp(7000, timeout=120) as conn:  # the service may still be starting: tcp() waits for it
        conn.settimeout(60)
        assert conn.recv(100) == b"served\n"


# A boot's time to its agent bounds the wait below: the booted VMs only.
@pytest.mark.parametrize("vm", path_launch_params(("boot",)), indirect=True)
def test_a_guest_with_the_wrong_token_is_turned_away(vm: MicroVM) -> None:
    assert vm.choice is not None and vm.ready_seconds is not None and not vm.cloned
    # Long enough for this host to boot the guest to its agent (measured on the module's
    # VM, with room for a busier host), so the timeout can only come from the refusal.
    wait = max(30.0, 2 * vm.ready_seconds + 30)
    cfg = vm.config.with_(kernel_cmdline=("microvm.token=0123456789abcdef",), boot_timeout=wait)
    with pytest.raises(BootError) as info:
        MicroVM(cfg, name="wrong-token").start()
    assert f"did not connect within {wait:.0f}s (turned away: " in str(info.value)
    assert "wrong token" in str(info.value)


@needs_kernel_path
def test_a_kernel_listener_turns_away_other_guests(microvm_image: GuestImage) -> None:
    """Any guest on the host can reach a host vsock port: only this VM's CID gets through."""
    cfg = VMConfig(image=microvm_image, vsock="kernel", snapshot=False)
    with MicroVM(cfg, name="ours") as ours, MicroVM(cfg, name="stranger") as stranger:
        assert ours.channel is not None and stranger.channel is not None
        assert ours.channel.guest_cid != stranger.channel.guest_cid
        with ours.listen(5400) as listener:
            stranger.start_process(f"echo intruder | microvm-agent --connect 2:{listener.port}")
            deadline = time.monotonic() + 120  # an inner guest under TCG inside TCG is slow
            while not listener.refused and time.monotonic() < deadline:
                with pytest.raises(CommandTimeout):
                    listener.accept(timeout=1)  # the stranger is turned away, not handed out
            assert listener.refused == [
                f"a connection from CID {stranger.channel.guest_cid}, not this VM's CID {ours.channel.guest_cid}"
            ]
            ours.start_process(f"echo ours | microvm-agent --connect 2:{listener.port}")
            with listener.accept(timeout=60) as conn:
                assert recv_all(conn) == b"ours\n"
