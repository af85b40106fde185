"""MicroVM: one throw-away guest, from QEMU launch to a probed agent and back to nothing.

Owns the VM's lifecycle: a private work directory, the vsock channel (one
:class:`~pytest_microvm.channel.Channel`, whichever flavour the host allows), QEMU with
its console and QMP, the agent connection, and the bounded shutdown. Every exit path —
success, failure, Ctrl-C, timeout, guest panic — goes through :meth:`MicroVM.stop`,
which leaves no process, socket or directory behind.

How the guest comes to life — a boot, a snapshot template's boot, a clone's restore — is
the VM's :class:`~pytest_microvm.machine.launch.Launch` strategy; this module never asks
which one it holds.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pytest_microvm import _logging, _wait
from pytest_microvm.channel import Channel, Listener, open_channel
from pytest_microvm.client import AgentClient, Command, Process, connect_agent, summarize
from pytest_microvm.errors import (
    BootError,
    CommandTimeout,
    ConfigError,
    ConnectionLost,
    GuestError,
    MicroVMError,
)
from pytest_microvm.image import GuestImage
from pytest_microvm.machine import launch as launches
from pytest_microvm.machine import network, storage
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import Choice, HostReport, choose, detect_host
from pytest_microvm.machine.launch import Boot, Launch
from pytest_microvm.machine.qemu import CONSOLE_TAIL, QemuProcess, qemu_argv
from pytest_microvm.machine.qmp import Monitor, MonitorError
from pytest_microvm.result import CommandResult

if TYPE_CHECKING:
    # paramiko costs 0.13 s to import, a tenth of a TCG boot of the small kernel: only
    # VMs that use SSH pay it.
    import paramiko

    from pytest_microvm.machine.ssh import GuestSsh

log = _logging.logger(__name__)
T = TypeVar("T")
QemuArgsHook = Callable[["VMConfig", list[str]], list[str]]


class Runstate(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


NETWORK_FORWARDS = (22,)  # guest TCP ports reachable from 127.0.0.1 with config.network
_warned_tcg: set[str] = set()  # architectures warned of: once each per process


# sockaddr_un holds 108 bytes; the longest name we put in the socket dir is "vsock_<port>".
_MAX_SOCKET_DIR = 108 - len("/vsock_4294967295") - 1


def _socket_dir(workdir: Path) -> Path:
    """Where the VM's Unix sockets go: its workdir, unless that path is too long for
    sockaddr_un (a deep TMPDIR on CI), then a short private directory of its own."""
    if len(os.fsencode(workdir)) <= _MAX_SOCKET_DIR:
        return workdir
    for base in (os.environ.get("XDG_RUNTIME_DIR"), "/tmp"):
        if base and len(base) < _MAX_SOCKET_DIR - 16 and os.access(base, os.W_OK):
            return Path(tempfile.mkdtemp(prefix="mvm-", dir=base))
    raise ConfigError(f"{workdir} is too long for Unix sockets and /tmp is not writable: set TMPDIR shorter")


class MicroVM:
    """A QEMU guest with the agent inside; use as a context manager.

    >>> with MicroVM(VMConfig(memory_mib=256)) as vm:
    ...     vm.run(["uname", "-r"]).stdout

    ``launch``: how it comes to life (default: a :class:`~.launch.Boot`); a snapshot clone
    is a MicroVM with a clone's launch (``vm.cloned``).
    """

    def __init__(
        self,
        config: VMConfig | None = None,
        *,
        host: HostReport | None = None,
        qemu_args_hook: QemuArgsHook | None = None,
        name: str = "vm",
        launch: Launch | None = None,
    ) -> None:
        self.config = config or VMConfig()
        self.launch = launch or Boot()
        self.name = name
        self.log = log.getChild(name)
        self._host = host
        self._qemu_args_hook = qemu_args_hook
        self.runstate = Runstate.CREATED
        self.choice: Choice | None = None
        self.workdir: Path | None = None
        self._sockdir: Path | None = None  # the workdir, or a short one when that is too long for sockets
        self.token = secrets.token_hex(16)
        self.ready_seconds: float | None = None
        self.qemu: QemuProcess | None = None
        self.monitor: Monitor | None = None
        self.channel: Channel | None = None
        self._listener: Listener | None = None
        self._client: AgentClient | None = None
        self._ssh: GuestSsh | None = None
        self._forwards: dict[int, Process] = {}
        self.forwarded_ports: dict[int, int] = {}  # with config.network: guest TCP port -> 127.0.0.1 port
        # Where commands without a cwd start: the host's cwd in host-userland mode, else "/".
        self.default_cwd: str | None = None
        # Who commands without a user= run as (None: root); an OCI image's User sets it.
        self.default_user: str | None = None
        # Variables every command gets, under the caller's env (an OCI image's Env).
        self.default_env: dict[str, str] = {}

    @property
    def cloned(self) -> bool:
        """True if this VM is a clone of a snapshot template, not a boot of its own."""
        return self.launch.cloned

    def rename(self, name: str) -> None:
        """Give a VM made ahead (a pooled clone) the name its user knows it by."""
        self.name = name
        self.log = log.getChild(name)

    # ---- lifecycle ----------------------------------------------------------------

    def start(self) -> MicroVM:
        """Boot and wait until the probe passes; on any failure, clean up and raise."""
        if self.runstate is not Runstate.CREATED:
            raise MicroVMError(f"{self.name}: start() in state {self.runstate.value}; a MicroVM boots once")
        self.runstate = Runstate.STARTING
        self.launch.attach(_Context(self))
        try:
            # Built (or found in the cache) before the clock starts: a first build of a
            # root must not eat the boot timeout, and ready_seconds is the boot alone.
            image = storage.image_for(self.config)
            started = time.monotonic()
            self._boot(image, started)
        except BaseException:
            # Ctrl-C and SystemExit pass through untouched, but never leave a VM behind.
            self.stop(graceful=False)
            raise
        self.ready_seconds = time.monotonic() - started
        self.runstate = Runstate.RUNNING
        self.log.info("ready in %.2fs (%s)", self.ready_seconds, self.choice.why if self.choice else "")
        return self

    def _boot(self, image: GuestImage, started: float) -> None:
        cfg = self.config
        host = (self._host or detect_host()).for_arch(cfg.arch)
        if host.qemu is None:
            raise ConfigError(host.missing_qemu())
        self.choice = choose(host, cfg.accel, cfg.vsock)
        if self.choice.accel == "tcg" and cfg.accel == "auto" and cfg.arch not in _warned_tcg:
            _warned_tcg.add(cfg.arch)  # once per process: the pytest header and the CLI say it too
            self.log.warning("KVM is not usable (%s): booting under TCG, several times slower", host.kvm.reason)
        self.default_cwd = storage.default_cwd(image, os.getcwd(), self.config)
        if image.defaults is not None:  # a container image's, as docker run applies them
            self.default_env = dict(image.defaults.env)
            self.default_cwd = image.defaults.cwd or self.default_cwd
            self.default_user = image.defaults.user
        self.workdir = Path(tempfile.mkdtemp(prefix=f"microvm-{self.name}-", dir=cfg.workdir))
        self._sockdir = _socket_dir(self.workdir)
        self.monitor = Monitor(self._sockdir / "qmp.sock")
        self.channel = open_channel(self.choice.vsock, self._sockdir, die_with_parent=not cfg.keep)
        self.channel.start()
        # The agent learns where to connect from the kernel command line (the channel
        # says what to write there: on the kernel path ports are host-wide).
        self._listener, port_arg = self.channel.listen_agent(cfg.port)
        layout = self.launch.layout()
        hello_token = self.launch.hello_token or self.token
        assert host.qemu is not None
        console = self.workdir / "console.log"
        argv = qemu_argv(
            image,
            qemu=host.qemu,
            accel=self.choice.accel,
            console=console,
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
            cmdline=[
                f"microvm.token={hello_token}",
                f"microvm.port={port_arg}",
                *storage.cmdline(image, cfg),
                *layout.cmdline,
                *cfg.kernel_cmdline,
            ],
            shared_memory=self.channel.shared_memory,
            ram_file=layout.ram_file,
            ram_shared=layout.ram_shared,
            extra=[
                *self.channel.qemu_args(),
                *layout.args,
                *storage.qemu_args(image, cfg),
                *self.monitor.qemu_args(),
                *(network.qemu_args(NETWORK_FORWARDS) if cfg.network else []),
                *cfg.qemu_args,
            ],
        )
        if self._qemu_args_hook is not None:
            argv = self._qemu_args_hook(cfg, argv)
        self.qemu = QemuProcess(
            argv, console, self.workdir / "qemu.stderr", die_with_parent=not cfg.keep, pass_fds=layout.pass_fds
        )
        self.qemu.start()
        deadline = started + cfg.boot_timeout
        kind = self.launch.failure_kind
        self.launch.launched(deadline)
        # Waiting for the agent also watches QEMU, the console and the backend, so a QEMU
        # that refused its arguments is reported at once, with its stderr.
        self._client = self._await_agent(hello_token, *self.launch.agent_deadline(deadline))
        self.token = self.launch.connected(self._client) or self.token
        try:
            self._client.probe(timeout=max(1.0, deadline - time.monotonic()))
        except MicroVMError as exc:
            raise self._failure(f"the probe failed: {exc}", kind) from exc
        try:
            self.monitor.connect()  # QEMU made its monitor socket long before the guest was up
        except MonitorError as exc:
            raise self._failure(f"QEMU's monitor did not answer ({exc})", kind) from exc
        mount = storage.mount_command(cfg) if self.launch.mounts_shares else None
        if mount is not None:
            r = self._client.run(mount, timeout=30)
            if r.exit_code != 0:
                raise self._failure(f"mounting the shares failed: {r.stderr.decode(errors='replace')}", kind)
        if cfg.network:
            self._setup_network()
        self._write_state(self._listener.port)

    def _setup_network(self) -> None:
        assert self._client is not None and self.monitor is not None
        r = self._client.run(["sh", "-c", network.GUEST_SETUP], timeout=30)
        if r.exit_code != 0:
            why = r.stderr.decode(errors="replace").strip()
            raise self._failure(f"configuring the guest's network failed: {why}", BootError)
        try:
            info = str(self.monitor.command("human-monitor-command", **{"command-line": "info usernet"})["return"])
        except MonitorError as exc:
            raise self._failure(f"QEMU's monitor did not list the forwarded ports ({exc})", BootError) from exc
        self.forwarded_ports = network.forwarded_ports(info)
        missing = set(NETWORK_FORWARDS) - set(self.forwarded_ports)
        if missing:
            raise self._failure(f"QEMU did not forward guest port(s) {sorted(missing)}: {info}", BootError)

    def _await_agent(self, token: str, deadline: float, limit: float | None) -> AgentClient:
        """Accept the agent's connection (saying ``token``), watching QEMU, the console and
        the backend meanwhile.

        ``limit``: the wait an error names (None: the boot timeout ``deadline`` comes from).
        """
        assert self._listener is not None and self.qemu is not None
        kind = self.launch.failure_kind
        refused: list[str] = []
        try:
            # A peer with the wrong CID or token is not our guest: keep waiting for ours,
            # and say what was turned away if ours never comes.
            return connect_agent(
                self._listener,
                token=token,
                timeout=deadline - time.monotonic(),
                name=self.name,
                watch=lambda: self._raise_if_dead(kind),
                refused=refused,
            )
        except CommandTimeout:
            waited = self.config.boot_timeout if limit is None else limit
            why = f" (turned away: {summarize(refused)})" if refused else ""
            raise self._failure(f"the agent did not connect within {waited:.0f}s{why}", kind) from None

    def _raise_if_dead(self, kind: type[GuestError]) -> None:
        assert self.qemu is not None
        console = self.qemu.console()
        if "Kernel panic" in console:
            raise self._failure("the guest kernel panicked", kind)
        code = self.qemu.returncode()
        if code is not None:
            raise self._failure(f"QEMU exited with status {code}", kind)
        if self.channel is not None:
            try:
                self.channel.check_alive()
            except MicroVMError as exc:
                raise self._failure(str(exc), kind) from exc

    def _failure(self, message: str, kind: type[GuestError] = GuestError) -> GuestError:
        console = self.qemu.console()[-CONSOLE_TAIL:] if self.qemu else ""
        stderr = self.qemu.stderr()[-CONSOLE_TAIL:] if self.qemu else ""
        return kind(f"{self.name}: {message}", console_tail=console, qemu_stderr=stderr)

    def _write_state(self, port: int) -> None:
        """What a later `microvm attach` needs to reach a kept VM."""
        assert self.workdir is not None and self.qemu is not None
        state = {
            "name": self.name,
            "qemu_pid": self.qemu.pid,
            "token": self.token,
            "vsock": self.choice.vsock if self.choice else None,
            "channel": self.channel.state() if self.channel else {},
            "agent_port": port,
            "qmp": str(self.monitor.path) if self.monitor else None,
            "sockets": str(self._sockdir),
            "console": str(self.qemu.console_path),
            "forwarded_ports": {str(guest): host for guest, host in self.forwarded_ports.items()},
        }
        (self.workdir / "vm.json").write_text(json.dumps(state, indent=2) + "\n")

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        """Power off (agent, then QMP quit, then SIGTERM, then SIGKILL), bounded in time,
        and remove everything the VM made.

        ``keep=True`` (default: ``config.keep``) leaves a running VM up for debugging; it
        can outlive this process only if it was booted with ``config.keep`` set.
        """
        if self.runstate in (Runstate.STOPPED, Runstate.STOPPING):
            return
        keep = self.config.keep if keep is None else keep
        if keep and self.runstate in (Runstate.RUNNING, Runstate.PAUSED):
            self.log.warning("keeping %s running: %s", self.name, self.workdir)
            if self._client is not None:
                self._client.close()
            self.runstate = Runstate.STOPPED
            return
        self.runstate = Runstate.STOPPING
        deadline = time.monotonic() + timeout
        try:
            if self._ssh is not None:
                self._ssh.close()
            if self.qemu is not None and self.qemu.returncode() is None and graceful:
                self._graceful_poweroff(deadline)
        finally:
            if self._client is not None:
                self._client.close()
            if self.qemu is not None:
                self.qemu.stop(grace=max(0.5, min(3.0, deadline - time.monotonic())))
            if self.monitor is not None:
                self.monitor.close()
            if self._listener is not None:
                self._listener.close()
            if self.channel is not None:
                self.channel.stop()
            self.launch.release()
            for directory in (self._sockdir, self.workdir):
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
            self.runstate = Runstate.STOPPED

    def _graceful_poweroff(self, deadline: float) -> None:
        assert self.qemu is not None
        with contextlib.suppress(MicroVMError):
            if self.runstate is Runstate.PAUSED and self.monitor is not None:
                self.monitor.resume()
            if self._client is not None and self._client.connected:
                self._client.poweroff(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        if self._wait_exit(min(deadline, time.monotonic() + 5.0)):
            return
        with contextlib.suppress(MicroVMError):
            if self.monitor is not None:
                self.monitor.quit()
        self._wait_exit(min(deadline, time.monotonic() + 2.0))

    def _wait_exit(self, until: float) -> bool:
        qemu = self.qemu
        assert qemu is not None
        return _wait.until(lambda: qemu.returncode() is not None or None, until, 0.02) is not None

    def __enter__(self) -> MicroVM:
        if self.runstate is Runstate.CREATED:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(graceful=exc_type is None or not issubclass(exc_type, KeyboardInterrupt))

    # ---- using the guest --------------------------------------------------------------

    @property
    def client(self) -> AgentClient:
        if self.runstate not in (Runstate.RUNNING, Runstate.PAUSED) or self._client is None:
            raise MicroVMError(f"{self.name} is {self.runstate.value}, not running")
        return self._client

    def _guard(self, call: Callable[[], T]) -> T:
        """Run a client call; if the connection died, say why the guest died."""
        try:
            return call()
        except ConnectionLost as exc:
            # The connection usually drops because the guest died; give QEMU (a panic, a
            # kill) a moment to finish dying so the error can say so. Bounded: 3 s.
            _wait.until(lambda: self._raise_if_dead(GuestError), time.monotonic() + 3.0, 0.05)
            raise self._failure(f"lost the agent connection: {exc}") from exc

    def run(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        user: str | None = None,
    ) -> CommandResult:
        """Run a command in the guest (argv list, or a string for /bin/sh -c); see AgentClient.run."""
        cwd = self.default_cwd if cwd is None else cwd
        user = self.default_user if user is None else user
        env = {**self.default_env, **(env or {})} if self.default_env else env
        return self._guard(
            lambda: self.client.run(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, check=check, user=user)
        )

    def start_process(
        self,
        cmd: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        pty: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> Process:
        """Start a command and stream it (write stdin, read output as it comes, kill, wait).

        ``pty=(rows, cols)`` gives it a terminal, ``user`` another user (see AgentClient.start)."""
        cwd = self.default_cwd if cwd is None else cwd
        user = self.default_user if user is None else user
        env = {**self.default_env, **(env or {})} if self.default_env else env
        return self._guard(
            lambda: self.client.start(cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, pty=pty, user=user)
        )

    def put_file(self, local: str | os.PathLike[str], remote: str, *, mode: int | None = None) -> None:
        self._guard(lambda: self.client.put_file(local, remote, mode=mode))

    def get_file(self, remote: str, local: str | os.PathLike[str]) -> int:
        return self._guard(lambda: self.client.get_file(remote, local))

    def read_file(self, remote: str) -> bytes:
        return self._guard(lambda: self.client.read_file(remote))

    def write_file(self, remote: str, data: bytes, *, mode: int = 0o644) -> None:
        self._guard(lambda: self.client.write_file(remote, data, mode=mode))

    def ssh(self, timeout: float = 30.0, transport: str = "vsock") -> paramiko.SSHClient:
        """A connected paramiko SSHClient (exec, SFTP) to root in the guest.

        ``transport``: ``"vsock"`` (no network device needed) or ``"network"`` (TCP through
        QEMU's user-mode network; needs ``VMConfig(network=True)``). Needs an image with
        the ``ssh`` feature. Clients are closed when the VM stops.
        """
        if self._ssh is None:
            from pytest_microvm.machine.ssh import GuestSsh

            self._ssh = GuestSsh(self)
        ssh = self._ssh
        return self._guard(lambda: ssh.connect(timeout, transport))

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        return self.qemu.console() if self.qemu else ""

    def status(self) -> str:
        """QEMU's run state through QMP ('running', 'paused', …)."""
        if self.monitor is None:
            raise MicroVMError(f"{self.name} has no monitor ({self.runstate.value})")
        return self.monitor.status()

    def pause(self) -> None:
        if self.runstate is not Runstate.RUNNING or self.monitor is None:
            raise MicroVMError(f"{self.name}: pause() while {self.runstate.value}")
        self.monitor.pause()
        self.runstate = Runstate.PAUSED

    def resume(self) -> None:
        if self.runstate is not Runstate.PAUSED or self.monitor is None:
            raise MicroVMError(f"{self.name}: resume() while {self.runstate.value}")
        self.monitor.resume()
        self.runstate = Runstate.RUNNING

    @property
    def pids(self) -> list[int]:
        """Host processes of this VM (QEMU and, with the userspace vsock, the backend)."""
        qemu = [self.qemu.pid] if self.qemu and self.qemu.pid else []
        return qemu + (self.channel.pids if self.channel else [])

    def _channel(self) -> Channel:
        if self.channel is None or self.runstate not in (Runstate.RUNNING, Runstate.PAUSED):
            raise MicroVMError(f"{self.name} is {self.runstate.value}, not running")
        return self.channel

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A stream connection to guest vsock port ``port`` (something in the guest listens there).

        ConnectionLost at once if nothing listens; CommandTimeout if the guest does not
        answer within ``timeout`` seconds. The same on both vsock flavours.
        """
        return self._channel().connect(port, timeout)

    def tcp(self, port: int, timeout: float = 30.0) -> socket.socket:
        """A connection to TCP ``port`` on the guest's loopback (a service under test).

        The agent forwards vsock port ``port`` to it (``microvm-agent --forward``), started
        on first use; no network device is involved. Waits (up to ``timeout`` seconds)
        until something listens on the port in the guest, so a service still starting is
        not mistaken for one that closed the connection; ConnectionLost if nothing does.
        """
        deadline = time.monotonic() + timeout
        # Asked of the guest's kernel, not inferred from the forwarder closing the
        # connection in time: on a slow guest (TCG inside TCG) that close comes late.
        listening = [
            "sh",
            "-c",
            f"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -q ':{port:04X} [0-9A-F]*:0000 0A '",
        ]

        def listens() -> bool | None:
            return self.run(listening, timeout=max(1.0, deadline - time.monotonic())).exit_code == 0 or None

        if _wait.until(listens, deadline, 0.1) is None:
            raise ConnectionLost(f"nothing listens on TCP port {port} in the guest (waited {timeout:g}s)")
        if port not in self._forwards:
            self._forwards[port] = self.start_process(f"exec microvm-agent --forward {port} {port} >/dev/null 2>&1")
        # ConnectionLost until the forwarder listens on vsock.
        return _wait.until_deadline(
            deadline,
            (ConnectionLost,),
            lambda: self.connect(port, timeout=max(1.0, deadline - time.monotonic())),
            interval=0.1,
        )

    def listen(self, port: int | None = None) -> Listener:
        """Where this guest's connections to the host (CID 2) arrive: tell the guest ``listener.port``.

        That is ``port`` when it is free; on the kernel vsock path host ports are shared
        by every VM on the host, so when another process or xdist worker holds ``port`` a
        free one is picked (``None``: any free port). Only this VM's guest is accepted (its
        CID is checked); ``listener.accept(timeout)`` raises CommandTimeout if it never
        connects. Close it (or use ``with``) when done.
        """
        return self._channel().listen(port)


class _Context:
    """A MicroVM as its launch strategy sees it (:class:`~.launch.LaunchContext`)."""

    def __init__(self, vm: MicroVM) -> None:
        self._vm = vm

    @property
    def name(self) -> str:
        return self._vm.name

    @property
    def config(self) -> VMConfig:
        return self._vm.config

    @property
    def workdir(self) -> Path:
        assert self._vm.workdir is not None
        return self._vm.workdir

    @property
    def channel(self) -> Channel:
        assert self._vm.channel is not None
        return self._vm.channel

    @property
    def monitor(self) -> Monitor:
        assert self._vm.monitor is not None
        return self._vm.monitor

    @property
    def qemu(self) -> QemuProcess:
        assert self._vm.qemu is not None
        return self._vm.qemu

    def connect_monitor(self, until: float) -> None:
        # QEMU makes its monitor socket a moment after it starts, and listens on it a moment
        # after that: knock first (a refused knock costs nothing), then speak QMP.
        def answered() -> bool | None:
            self.raise_if_dead(self._vm.launch.failure_kind)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as knock:
                try:
                    knock.connect(str(self.monitor.path))
                    return True
                except (FileNotFoundError, ConnectionRefusedError):
                    return None

        if _wait.until(answered, until, 0.002) is None:
            raise MonitorError(f"QEMU did not open its monitor at {self.monitor.path}")
        self.monitor.connect()

    def disconnect_agent(self) -> None:
        if self._vm._listener is not None:
            self._vm._listener.close()
        if self._vm._client is not None:
            self._vm._client.close()

    def failure(self, message: str, kind: type[GuestError]) -> GuestError:
        return self._vm._failure(message, kind)

    def raise_if_dead(self, kind: type[GuestError]) -> None:
        self._vm._raise_if_dead(kind)

    def wait_exit(self, until: float) -> bool:
        return self._vm._wait_exit(until)


def boot(config: VMConfig | None = None, **kwargs: Any) -> MicroVM:
    """Start a MicroVM (a boot); with kernel vhost-vsock, again with a new guest CID when
    the host's kernel says the CID is taken (:func:`~.launch.start`)."""
    return launches.start(lambda: MicroVM(config, **kwargs))
