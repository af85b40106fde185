"""QEMU's user-mode network for a guest (``VMConfig(network=True)``): NIC, addresses, forwards.

The guest gets a virtio-net NIC on QEMU's built-in NAT (slirp): no root, no bridge, no
tap device, so it works wherever QEMU runs. The guest is 10.0.2.15, QEMU's gateway
10.0.2.2 and its DNS forwarder 10.0.2.3. Host ports forwarded to the guest are asked
for as port 0 and bound by QEMU itself, which leaves no window for another process to
take a port between picking and binding it; the ports QEMU got are read back from its
monitor (``info usernet``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
NETDEV_ID = "net0"

# Run in the guest through the agent once it is up. The interface is eth0: there is no
# udev in the image to rename it. The kernel marks the link up a moment after it is set
# up (link events are batched, up to a second); until then it drops what is sent, so
# the VM is not ready before that.
GUEST_SETUP = (
    "[ -e /sys/class/net/eth0 ] || { echo 'the guest has no eth0: no virtio-net NIC, or no driver' >&2; exit 1; }; "
    f"ip link set eth0 up && ip addr add {GUEST_ADDRESS}/24 dev eth0 && "
    f"ip route add default via {GATEWAY} && rm -f /etc/resolv.conf && echo 'nameserver {DNS}' >/etc/resolv.conf "
    "|| exit 1; "
    "for _ in $(seq 100); do [ $(cat /sys/class/net/eth0/operstate) = up ] && exit 0; sleep 0.05; done; "
    "echo 'eth0 did not come up within 5 s' >&2; exit 1"
)


def qemu_args(forward_ports: Sequence[int]) -> list[str]:
    """The netdev and NIC, with each guest TCP port forwarded from a free port on 127.0.0.1."""
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:0-{GUEST_ADDRESS}:{port}" for port in forward_ports)
    return ["-netdev", f"user,id={NETDEV_ID}{forwards}", "-device", f"virtio-net-pci,netdev={NETDEV_ID}"]


def forwarded_ports(usernet: str) -> dict[int, int]:
    """``{guest port: host port}`` from the text of the monitor's ``info usernet``.

    Lines look like ``TCP[HOST_FORWARD]  13  127.0.0.1 43755  10.0.2.15  22  0  0``.
    """
    ports = {}
    for line in usernet.splitlines():
        m = re.match(r"\s*TCP\[HOST_FORWARD\]\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)", line)
        if m:
            ports[int(m.group(2))] = int(m.group(1))
    return ports
