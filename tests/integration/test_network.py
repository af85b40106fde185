"""A real guest on QEMU's user-mode network (VMConfig(network=True)): address, NAT, forwards."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from pytest_microvm import BootError, GuestImage, MicroVM, VMConfig
from pytest_microvm.machine import network


@pytest.fixture(scope="module")
def vm(microvm_image: GuestImage) -> Iterator[MicroVM]:
    with MicroVM(VMConfig(image=microvm_image, network=True)) as machine:
        yield machine


def test_the_guest_has_its_address_and_route(vm: MicroVM) -> None:
    addr = vm.run(["ip", "-4", "addr", "show", "eth0"], check=True).stdout.decode()
    assert f"inet {network.GUEST_ADDRESS}/24" in addr
    assert f"default via {network.GATEWAY}" in vm.run(["ip", "route"], check=True).stdout.decode()
    # Up when the VM is ready, not a moment later.
    assert vm.run(["cat", "/sys/class/net/eth0/operstate"]).stdout == b"up\n"


def test_the_guest_reaches_a_host_service_through_the_gateway(vm: MicroVM) -> None:
    # QEMU's NAT maps the gateway address to the host's loopback.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"host saw {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        r = vm.run(["wget", "-qO-", f"http://{network.GATEWAY}:{port}/from-guest"], timeout=60)
        assert r.exit_code == 0, r.stderr
        assert r.stdout == b"host saw /from-guest"
    finally:
        server.shutdown()
        server.server_close()


def test_ssh_port_is_forwarded_from_a_free_loopback_port(vm: MicroVM) -> None:
    host_port = vm.forwarded_ports[22]
    assert 0 < host_port < 65536
    # QEMU holds the listening socket: binding the same port here must fail.
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", host_port))


def test_a_vm_without_network_has_no_nic(microvm: MicroVM) -> None:
    assert microvm.run(["ls", "/sys/class/net"], check=True).stdout.split() == [b"lo"]
    assert microvm.forwarded_ports == {}


def test_a_network_that_cannot_be_set_up_is_a_boot_error(microvm_image: GuestImage) -> None:
    def drop_nic(_cfg: VMConfig, argv: list[str]) -> list[str]:
        i = argv.index("-device", argv.index("-netdev"))
        return argv[:i] + argv[i + 2 :]  # the netdev stays, the guest gets no NIC

    vm = MicroVM(VMConfig(image=microvm_image, network=True), qemu_args_hook=drop_nic)
    with pytest.raises(BootError, match="configuring the guest's network failed: the guest has no eth0"):
        vm.start()
    assert vm.runstate.value == "stopped" and vm.qemu is not None and vm.qemu.returncode() is not None
