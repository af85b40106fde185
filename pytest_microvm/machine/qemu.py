"""The QEMU command line for a guest image, and the QEMU process with its console.

Argument lists only, never a shell. The serial console goes to a file so that it can
be attached to errors and test reports after the fact.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pytest_microvm import _proc, _wait
from pytest_microvm import arch as arches
from pytest_microvm.errors import BootError
from pytest_microvm.image import GuestImage

CONSOLE_TAIL = 4000  # characters of console log attached to errors


def _qemu_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # QEMU option syntax: a literal comma is doubled


def qemu_argv(
    image: GuestImage,
    *,
    qemu: str,
    accel: str,
    console: Path,
    memory_mib: int = 256,
    vcpus: int = 1,
    cmdline: Sequence[str] = (),
    shared_memory: bool = False,
    ram_file: str | None = None,
    ram_shared: bool = True,
    no_reboot: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """QEMU arguments booting ``image``, on the machine of its architecture (:mod:`pytest_microvm.arch`).

    x86_64: q35 with the PVH vmlinux: measured under TCG (QEMU 7.2, the same uncompressed
    kernel, an init that powers off at once, medians of 5), q35 reached poweroff in
    1.85 s and ``-M microvm,pit=on,rtc=on`` in 1.82 s, but microvm hung in 2-5 boots of
    10 when a loaded host made the guest's PIT calibration fail, unless given the host's
    TSC frequency; q35 has an HPET and needs no such hint. ``-no-reboot`` with
    ``panic=-1`` turns a guest panic into an immediate QEMU exit.

    ``no_reboot=False`` lets a guest reboot in place (QEMU keeps running).
    ``shared_memory`` backs guest RAM with a shared memfd, which a vhost-user backend
    (the userspace vsock) needs to map the rings and buffers. ``ram_file`` backs it with
    that file instead: shared (a snapshot template writes its RAM into it), or with
    ``ram_shared=False`` mapped private, copy-on-write (a clone on the kernel path reads
    its template's RAM and pays only for the pages it writes: machine/snapshot/).
    """
    arch = arches.get(image.arch)
    append = [f"console={arch.console}", "panic=-1", "quiet", *cmdline]
    machine = arch.machine(accel)
    memory: list[str] = []
    if ram_file is not None:
        machine += ",memory-backend=mem"
        path = _qemu_path(Path(ram_file))
        share = "on" if ram_shared else "off"
        memory = ["-object", f"memory-backend-file,id=mem,size={memory_mib}M,mem-path={path},share={share}"]
    elif shared_memory:
        machine += ",memory-backend=mem"
        memory = ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"]
    return [
        qemu,
        "-machine", machine,
        *memory,
        *arch.cpu(accel),
        "-m", str(memory_mib),
        "-smp", str(vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        *(["-no-reboot"] if no_reboot else []),
        "-chardev", f"file,id=console,path={_qemu_path(console)}",
        "-serial", "chardev:console",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", " ".join(append),
        *extra,
    ]  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """What differs between a boot, a snapshot template and a clone on the command line:
    the RAM file (None: anonymous or memfd) and whether it is shared, device arguments,
    kernel command-line additions, descriptors QEMU inherits."""

    args: list[str] = field(default_factory=list)
    cmdline: list[str] = field(default_factory=list)
    ram_file: str | None = None
    ram_shared: bool = True
    pass_fds: tuple[int, ...] = ()


def device_args(driver: str, **props: str | int) -> list[str]:
    """``-device driver,k=v,...``: the same properties QMP's device_add takes."""
    return ["-device", ",".join([driver, *(f"{k}={v}" for k, v in props.items())])]


class QemuProcess:
    """One QEMU process, its console file and its stderr; stopped on exit from ``with``."""

    def __init__(
        self,
        argv: Sequence[str],
        console: Path,
        stderr: Path,
        *,
        die_with_parent: bool = True,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.argv = list(argv)
        self.pass_fds = tuple(pass_fds)
        self.die_with_parent = die_with_parent
        self.console_path = console
        self.stderr_path = stderr
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        self.console_path.touch()
        with self.stderr_path.open("wb") as err:
            self._proc = _proc.spawn(
                self.argv,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=self.pass_fds,
                die_with_parent=self.die_with_parent,
            )

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def boot_error(self, message: str) -> BootError:
        return BootError(
            message, console_tail=self.console()[-CONSOLE_TAIL:], qemu_stderr=self.stderr()[-CONSOLE_TAIL:]
        )

    def wait_for_console(self, needles: Sequence[str], timeout: float, interval: float = 0.05) -> str:
        """Wait until every string in ``needles`` appeared on the console; return the console.

        Raises BootError with the console tail if QEMU exits, the kernel panics, or
        ``timeout`` passes first.
        """

        def shown() -> str | None:
            text = self.console()
            if all(n in text for n in needles):
                return text
            if "Kernel panic" in text:
                raise self.boot_error("the guest kernel panicked")
            code = self.returncode()
            if code is not None:
                raise self.boot_error(f"QEMU exited with status {code} during boot")
            return None

        text = _wait.until(shown, time.monotonic() + timeout, interval)
        if text is None:
            missing = [n for n in needles if n not in self.console()]
            raise self.boot_error(f"the console did not show {missing} within {timeout:.0f}s")
        return text

    def stop(self, grace: float = 3.0) -> None:
        if self._proc is not None:
            _proc.stop(self._proc, grace)

    def __enter__(self) -> QemuProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
