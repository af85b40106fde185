"""The QEMU side: what this host can run (accelerator, vsock flavour) and the QEMU process.

- :mod:`.host`: detection, with a reason for every decision.
- :mod:`.qemu`: the QEMU command line and process (console capture, bounded stop).
"""

from pytest_microvm.machine.host import HostReport, detect_host
from pytest_microvm.machine.qemu import QemuProcess, qemu_argv

__all__ = ["HostReport", "QemuProcess", "detect_host", "qemu_argv"]
