"""Runs the real agent binary on the host against the real client over a Unix socket.

Shared by the unit tests (no VM): the agent process is the same binary that runs as
PID 1 in the image, only connected to a Unix socket instead of vsock. Also the /proc
helpers the tests use to check that nothing is left running.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytest_microvm import _proc
from pytest_microvm import protocol as p
from pytest_microvm.channel import UnixListener
from pytest_microvm.client import AgentClient, connect_agent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class HostAgent:
    """An agent process on the host plus the listener it connects to."""

    def __init__(self, binary: Path, workdir: Path, token: str | None = None, ignore: Sequence[str] = ()) -> None:
        """``ignore``: signal names (``INT``, ``QUIT``, ...) the agent inherits ignored, as
        from a script that started it in the background."""
        self.token = token if token is not None else secrets.token_hex(16)
        self.socket_path = workdir / "agent.sock"
        self.listener = UnixListener(self.socket_path)
        argv = [str(binary), "--unix", str(self.socket_path), "--token", self.token]
        if ignore:  # the shell sets them ignored and exec keeps them so: the agent's pid is the shell's
            argv = ["sh", "-c", f'trap \'\' {" ".join(ignore)}; exec "$0" "$@"', *argv]
        self.proc: subprocess.Popen[bytes] = _proc.spawn(argv, stderr=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 10.0) -> AgentClient:
        """Accept the agent's next connection and handshake."""
        return connect_agent(self.listener, token=self.token, timeout=timeout)

    def raw(self, timeout: float = 10.0) -> socket.socket:
        """Accept the agent's next connection without a handshake."""
        return self.listener.accept(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        _proc.stop(self.proc, grace=1.0)
        self.listener.close()


@contextmanager
def host_agent(
    binary: Path, workdir: Path, token: str | None = None, ignore: Sequence[str] = ()
) -> Iterator[HostAgent]:
    agent = HostAgent(binary, workdir, token, ignore)
    try:
        yield agent
    finally:
        agent.close()


@contextmanager
def reaping(*procs: subprocess.Popen[Any]) -> Iterator[None]:
    """Kill and reap whatever of ``procs`` still runs on the way out, whatever happened: a
    test's processes never outlive it (nor warn, unreaped, inside whichever test runs next)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def handshake_raw(agent: HostAgent) -> socket.socket:
    """Accept the agent's next connection and answer its HELLO, checking its token: a raw
    socket for tests that speak frames themselves."""
    sock = agent.raw()
    sock.settimeout(5)
    dec = p.FrameDecoder()
    frames: list[p.Frame] = []
    while not frames:
        frames = dec.feed(sock.recv(4096))
    assert frames[0].type is p.FrameType.HELLO
    assert p.parse_hello(frames[0].payload).token == agent.token
    sock.sendall(p.encode_hello_ack())
    return sock


def drain(sock: socket.socket, timeout: float = 5.0) -> list[p.Frame]:
    """Everything the agent sends until it closes the connection (a timeout fails the test);
    the decoder checks each frame is well-formed."""
    sock.settimeout(timeout)
    dec = p.FrameDecoder()
    frames: list[p.Frame] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return frames
        frames += dec.feed(data)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (to check the agent leaves no command behind)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def processes_mentioning(text: str) -> dict[int, str]:
    """``{pid: command line}`` of every other process whose command line, or a file it
    holds open, contains ``text``: to find what a VM or a build left running (a backend
    forked by the fork server has the server's command line, and its VM's log open)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline or _holds_open(int(entry), text):
                found[int(entry)] = cmdline.strip()
    return found


def _holds_open(pid: int, text: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if text in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return True
        except OSError:
            continue
    return False
