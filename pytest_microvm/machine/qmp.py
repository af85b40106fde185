"""QMP through qemu.qmp: the VM's status, pause/resume, and quit.

We bind the QMP socket and QEMU connects to it as a client, so there is no window in
which QEMU is up but its monitor socket does not exist yet.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from pytest_microvm.errors import MicroVMError


class MonitorError(MicroVMError):
    """A QMP command failed or QEMU's monitor is unreachable."""


class Monitor:
    """One QMP connection to one QEMU (server side)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._qmp = QEMUMonitorProtocol(str(path), server=True, nickname=path.parent.name)
        self._connected = False

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id=qmp,path={self.path}", "-mon", "chardev=qmp,mode=control"]

    def accept(self, timeout: float) -> None:
        try:
            self._qmp.accept(timeout)
        except Exception as exc:  # qemu.qmp raises its own tree; callers want ours
            raise MonitorError(f"QEMU did not connect to its monitor socket: {exc}") from exc
        self._connected = True

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        if not self._connected:
            raise MonitorError(f"QMP {name}: the monitor is not connected")
        try:
            reply = self._qmp.cmd_obj({"execute": name, "arguments": args})
        except Exception as exc:
            raise MonitorError(f"QMP {name} failed: {exc}") from exc
        if "error" in reply:
            raise MonitorError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply

    def status(self) -> str:
        """QEMU's run state: 'running', 'paused', 'shutdown', …"""
        return str(self.command("query-status")["return"]["status"])

    def pause(self) -> None:
        self.command("stop")

    def resume(self) -> None:
        self.command("cont")

    def quit(self) -> None:
        self.command("quit")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a monitor whose QEMU is gone is not an error
            self._qmp.close()
        self._connected = False
        self.path.unlink(missing_ok=True)
