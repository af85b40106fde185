"""The QEMU side: what this host can run (accelerator, vsock flavour) and the QEMU process.

- :mod:`.host`: detection, with a reason for every decision.
- :mod:`.qemu`: the QEMU command line and process (console capture, bounded stop).
- :mod:`.qmp`: QMP through qemu.qmp (status, pause/resume, quit).
- :mod:`.allocation`: guest CIDs and host ports for the kernel vhost-vsock path.
- :mod:`.config`: VMConfig, how to boot one VM.
- :mod:`.network`: the user-mode network (NIC, addresses, forwarded ports).
- :mod:`.storage`: the guest's root disk or host root, and host directory shares (9p).
- :mod:`.ssh`: paramiko clients to the guest's dropbear.
- :mod:`.vm`: MicroVM, the lifecycle that ties them together.
- :mod:`.snapshot`: templates and clones of them (a fresh VM without a boot).
- :mod:`.pool`: clones made ahead in the background.
"""

from pytest_microvm.machine.config import Share, VMConfig
from pytest_microvm.machine.host import Choice, HostReport, choose, detect_host
from pytest_microvm.machine.qemu import QemuProcess, qemu_argv
from pytest_microvm.machine.vm import MicroVM, Runstate, boot

__all__ = [
    "Choice",
    "HostReport",
    "MicroVM",
    "QemuProcess",
    "Runstate",
    "Share",
    "VMConfig",
    "boot",
    "choose",
    "detect_host",
    "qemu_argv",
]
