"""`microvm shell` and `microvm doctor` driven as a person would: through a terminal."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from pytest_microvm import GuestImage
from pytest_microvm import arch as arches


class Terminal:
    """A pseudo-terminal with a program on its slave side; the test types on the master."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.screen = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, text: bytes, timeout: float = 60.0) -> float:
        """Read until ``text`` appears after what was already seen; return how long it took."""
        start, mark = time.monotonic(), len(self.screen)
        while text not in self.screen[mark:]:
            remaining = start + timeout - time.monotonic()
            assert remaining > 0, f"{text!r} never appeared; screen tail: {self.screen[-800:]!r}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the program closed the terminal
                    break
        assert text in self.screen[mark:], f"{text!r} never appeared; screen tail: {self.screen[-800:]!r}"
        return time.monotonic() - start

    def drain(self, seconds: float) -> None:
        """Read whatever the program prints for ``seconds`` (so later expects see only new output)."""
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            if select.select([self.master], [], [], remaining)[0]:
                self.screen += os.read(self.master, 65536)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
            except (OSError, ValueError):
                pass
    return kids


def test_shell_runs_commands_forwards_ctrl_c_and_cleans_up(microvm_image: GuestImage) -> None:
    term = Terminal([sys.executable, "-m", "pytest_microvm.cli", "shell"])
    try:
        term.expect(b"microvm:~# ", timeout=180)  # the prompt (PS1) of the guest shell
        vm_pids = children(term.proc.pid)
        assert len(vm_pids) == 2  # QEMU and the vsock backend
        term.type(b"echo hi-$((40+2))\r")
        term.expect(b"hi-42")
        term.type(b"tty\r")
        term.expect(b"/dev/pts/")
        # The quotes keep the echo of the line from containing the word the command prints.
        term.type(b'sleep 30; echo SL""EPT\r')
        term.drain(1.5)  # the line's echoes; sleep is running now
        term.type(b"\x03")  # Ctrl-C reaches the guest's foreground job
        took = term.expect(b"microvm:~# ")
        assert took < 10 and b"SLEPT" not in term.screen
        term.type(b"exit 5\r")
        assert term.proc.wait(60) == 5
    finally:
        term.close()
    time.sleep(0.5)
    assert not [p for p in vm_pids if Path(f"/proc/{p}").exists()]


def test_doctor_names_what_will_be_used() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "will use     accel=" in proc.stdout and "vsock=" in proc.stdout
    # Each architecture, with its QEMU and how it runs here (KVM only for the host's own).
    for arch in arches.NAMES:
        assert re.search(rf"^\[ok\] {arch} +/\S+qemu-system-{arch} \(.*\); runs under (KVM|TCG)", proc.stdout, re.M)
    assert f"guests below: {arches.host_name()}" in proc.stdout


def test_doctor_for_the_other_architecture_says_tcg() -> None:
    other = next(a for a in arches.NAMES if a != arches.host_name())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_microvm.cli", "doctor", "--arch", other],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"KVM runs only {arches.host_name()} guests" in proc.stdout and "will use     accel=tcg" in proc.stdout
