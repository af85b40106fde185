"""QMP through qemu.qmp: the VM's status, pause/resume and quit, devices, and migration.

QEMU serves its monitor on a Unix socket (``server=on,wait=off``) and we connect once the
guest is up: by then the socket certainly exists, and a QEMU that fails early leaves no
half-made QMP session behind on our side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from pytest_microvm.errors import MicroVMError

# qemu.qmp logs at ERROR when QEMU goes away under it (a guest powering off, a restore
# QEMU refuses); every such failure reaches our callers as a MonitorError that says it.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class MonitorError(MicroVMError):
    """A QMP command failed or QEMU's monitor is unreachable."""


class Monitor:
    """One QMP connection to one QEMU (client side)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._qmp: QEMUMonitorProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # ours to close, if we made one
        self._interrupted = False  # a KeyboardInterrupt (or SystemExit) left a call midway

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id=qmp,path={self.path},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]

    def connect(self) -> None:
        if self._qmp is not None:
            return  # connected earlier (a clone talks to QEMU before its guest is up)
        # qemu.qmp's synchronous client runs on the calling thread's event loop and, in a
        # thread without one, makes one and leaves it set there, never closed: every VM
        # booted from a worker thread leaked a loop (an epoll fd and a socket pair) and
        # printed an "Exception ignored" at exit. In such a thread, hand it a loop of our
        # own for the duration of the constructor only, and close that loop in close().
        if not _thread_has_event_loop():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        try:
            qmp = QEMUMonitorProtocol(str(self.path), nickname=self.path.parent.name)
        finally:
            if self._loop is not None:
                asyncio.set_event_loop(None)  # it keeps its reference; the thread keeps none
        try:
            qmp.connect()
        except Exception as exc:  # qemu.qmp raises its own tree; callers want ours
            with contextlib.suppress(Exception):
                qmp.close()
            self._close_loop()
            raise MonitorError(f"cannot connect to QEMU's monitor at {self.path}: {exc}") from exc
        self._qmp = qmp

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        if self._qmp is None:
            raise MonitorError(f"QMP {name}: the monitor is not connected")
        try:
            reply = self._qmp.cmd_obj({"execute": name, "arguments": args})
        except Exception as exc:
            raise MonitorError(f"QMP {name} failed: {exc}") from exc
        except BaseException:
            self._interrupted = True
            raise
        if "error" in reply:
            raise MonitorError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS) under ``name``, for URIs such as ``fd:name``."""
        if self._qmp is None:
            raise MonitorError("getfd: the monitor is not connected")
        try:
            self._qmp.send_fd_scm(fd)
        except Exception as exc:
            raise MonitorError(f"passing a descriptor to QEMU failed: {exc}") from exc
        except BaseException:
            self._interrupted = True
            raise
        self.command("getfd", fdname=name)

    def status(self) -> str:
        """QEMU's run state: 'running', 'paused', 'shutdown', …"""
        return str(self.command("query-status")["return"]["status"])

    def pause(self) -> None:
        self.command("stop")

    def resume(self) -> None:
        self.command("cont")

    def quit(self) -> None:
        self.command("quit")

    # ---- devices (a snapshot's vsock device is plugged and unplugged at run time) ----------

    def device_add(self, driver: str, id: str, **props: str) -> None:
        self.command("device_add", driver=driver, id=id, **props)

    def device_del(self, id: str) -> None:
        """Ask the guest to release device ``id``; it is gone once :meth:`peripherals` lacks it."""
        self.command("device_del", id=id)

    def peripherals(self) -> set[str]:
        """The ids of the devices given an id (``-device ...,id=`` or ``device_add``)."""
        return {p["name"] for p in self.command("qom-list", path="/machine/peripheral")["return"]}

    # ---- migration: how snapshot templates are saved and clones restored --------------------

    def set_migration_capabilities(self, **capabilities: bool) -> None:
        """e.g. ``x_ignore_shared=True`` (``_`` for QMP's ``-``)."""
        caps = [{"capability": name.replace("_", "-"), "state": state} for name, state in capabilities.items()]
        self.command("migrate-set-capabilities", capabilities=caps)

    def migrate(self, uri: str) -> None:
        """Start saving the (stopped) guest to ``uri``; :meth:`migration` says when it ends."""
        self.command("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        """Start loading a saved guest from ``uri`` (QEMU started with ``-incoming defer``)."""
        self.command("migrate-incoming", uri=uri)

    def migration(self) -> tuple[str, str]:
        """The migration's status (``active``, ``completed``, ``failed``, …) and QEMU's reason
        when it failed."""
        info = self.command("query-migrate")["return"]
        status = str(info.get("status", "none"))
        return status, str(info.get("error-desc", status))

    def close(self) -> None:
        # After a Ctrl-C inside one of qemu.qmp's calls its session is in an unknown state,
        # and its orderly disconnect can wait forever: drop it; QEMU is being stopped anyway.
        if self._qmp is not None and not self._interrupted:
            with contextlib.suppress(Exception):  # closing a monitor whose QEMU is gone is not an error
                self._qmp.close()
        self._qmp = None
        self._close_loop()
        self.path.unlink(missing_ok=True)

    def _close_loop(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None


def _thread_has_event_loop() -> bool:
    """True if asyncio would give this thread an event loop without creating one here."""
    if threading.current_thread() is threading.main_thread():
        return True  # the main thread's loop is created on demand and lives with the process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.get_event_loop()
    except RuntimeError:
        return False
    return True
