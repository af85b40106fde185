"""The QEMU side: what this host can run (accelerator, vsock flavour) and the QEMU process.

- :mod:`.host`: detection, with a reason for every decision.
- :mod:`.qemu`: the QEMU command line and process (console capture, bounded stop).
- :mod:`.qmp`: QMP through qemu.qmp (status, pause/resume, quit).
- :mod:`.config`: VMConfig, how to boot one VM.
- :mod:`.network`: the user-mode network (NIC, addresses, forwarded ports).
- :mod:`.storage`: the guest's root disk or host root, and host directory shares (9p).
- :mod:`.ssh`: paramiko clients to the guest's dropbear (needs only a running guest, not vm.py).
- :mod:`.vm`: MicroVM, the lifecycle that ties them together.
- :mod:`.snapshot`: templates and clones of them (a fresh VM without a boot).
- :mod:`.pool`: clones made ahead in the background.

Names are imported on first use (PEP 562): importing one module of this package (the
ssh clients, the host report) does not import the whole lifecycle with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Share": "config",
    "VMConfig": "config",
    "Choice": "host",
    "HostReport": "host",
    "choose": "host",
    "detect_host": "host",
    "QemuProcess": "qemu",
    "qemu_argv": "qemu",
    "MicroVM": "vm",
    "Runstate": "vm",
    "boot": "vm",
}
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_microvm.machine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_microvm.machine.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from pytest_microvm.machine.config import Share, VMConfig
    from pytest_microvm.machine.host import Choice, HostReport, choose, detect_host
    from pytest_microvm.machine.qemu import QemuProcess, qemu_argv
    from pytest_microvm.machine.vm import MicroVM, Runstate, boot
