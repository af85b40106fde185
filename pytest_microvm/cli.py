"""The ``microvm`` command: build the guest image, check that it boots, run a command in a VM.

Progress goes to stderr, results (paths) to stdout, so scripts can capture them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from pytest_microvm import __version__
from pytest_microvm.options import (
    DOCTOR,
    IMAGE,
    VM,
    OptionError,
    add_cli_options,
    cli_values,
    image_request,
    kernel_matrix,
    one_kernel,
    vm_config,
)

# Only the standard library and the option table at the top: `microvm --help` and a typo
# answer at once. Each command imports what it uses (the image builder, QEMU's monitor
# client, the snapshot code) when it runs.
TYPE_CHECKING = False  # typing itself costs `microvm --help` a tenth of its time
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, TextIO

    from pytest_microvm.client import Process
    from pytest_microvm.image import GuestImage
    from pytest_microvm.machine import VMConfig
    from pytest_microvm.result import CommandResult


def _progress() -> Callable[[str], None]:
    start = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def _build(values: dict[str, Any], kernel: str | None) -> GuestImage:
    from pytest_microvm.image import build_image

    return build_image(**image_request(values, kernel), progress=_progress())


def _vm_config(args: argparse.Namespace, **changes: object) -> VMConfig:
    """The VMConfig that `run` and `shell` options ask for, with the image built first."""
    from pytest_microvm.machine.config import Share

    values = cli_values(args, VM)
    for spec in values["shares"] or ():
        Share.parse(spec)  # a typo is an error before the image is built
    return vm_config(values, image=_build(values, one_kernel(values, f"microvm {args.command}")), **changes)


def cmd_image_build(args: argparse.Namespace) -> int:
    """Build the image for each kernel asked for (a matrix builds them all), print their paths."""
    values = cli_values(args, IMAGE)
    for n, kernel in enumerate(kernel_matrix(values)):
        if n:
            print()
        _print_image(_build(values, kernel))
    return 0


def _print_image(image: GuestImage) -> None:
    print(f"image:     {image.directory}")
    boot = "PVH boot" if image.pvh else image.kernel.name
    print(f"kernel:    {image.kernel} ({image.kernel_release}, {image.arch}, {boot})")
    print(f"initramfs: {image.initramfs}")
    print(f"agent:     {image.agent_version}; modules: {' '.join(image.modules) or '(none: built in)'}")
    if image.root_disk is not None:
        print(f"root:      {image.root_disk} ({image.root_disk.stat().st_size / 1e6:.1f} MB, EROFS)")
    elif image.root_kind == "host":
        print("root:      the host's / over 9p, read-only, under a tmpfs overlay")
    elif image.packages or image.rootfs:
        print("root:      packed into the initramfs (mkfs.erofs missing)")


def cmd_image_check(args: argparse.Namespace) -> int:
    """Boot the image and watch the console for the agent as PID 1 and its modules."""
    import tempfile
    from pathlib import Path

    from pytest_microvm.machine import QemuProcess, VMConfig, detect_host, qemu_argv, storage

    values = cli_values(args, IMAGE)
    image = _build(values, one_kernel(values, "microvm image check"))
    host = detect_host(arch=image.arch)
    if host.qemu is None:
        print(f"error: {host.missing_qemu()}", file=sys.stderr)
        return 2
    if host.accel == "tcg":
        print(
            f"warning: KVM is not usable ({host.kvm.reason}); booting under TCG emulation, which is slower",
            file=sys.stderr,
        )
    needles = ["microvm-agent: " + image.agent_version + " running as PID 1"]
    needles += [f"microvm-agent: loaded module {m}" for m in image.modules]
    plain = VMConfig(image=image)
    if image.root_kind != "initramfs":  # the root disk (or host root) mounted and switched into
        needles.append("microvm-agent: root is ")
    with tempfile.TemporaryDirectory(prefix="microvm-check-") as tmp:
        console = Path(tmp) / "console.log"
        argv = qemu_argv(
            image, qemu=host.qemu, accel=host.accel, console=console,
            cmdline=storage.cmdline(image, plain), extra=storage.qemu_args(image, plain),
        )  # fmt: skip
        start = time.monotonic()
        with QemuProcess(argv, console, Path(tmp) / "qemu.stderr") as vm:
            text = vm.wait_for_console(needles, timeout=args.timeout)
        elapsed = time.monotonic() - start
    for line in text.splitlines():
        if line.startswith("microvm-agent:"):
            print(line)
    print(
        f"ok: the agent runs as PID 1 and loaded {len(image.modules)} modules, {elapsed:.1f}s after QEMU started "
        f"({host.accel})"
    )
    return 0


def _stream(proc: Process) -> CommandResult:
    """Copy a guest command's stdout and stderr to ours as they come; return its result."""
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    while (chunk := proc.read()) is not None:
        sinks[chunk[0]].write(chunk[1])
        sinks[chunk[0]].flush()
    return proc.wait()


def _exit_status(result: CommandResult) -> int:
    """The shell's convention: the exit code, or 128+N for death by signal N."""
    return 128 + result.signal if result.signal else result.exit_code


def _pipe_or_file(stream: TextIO | None) -> bool:
    """Whether our standard input is there to forward: open, and not a terminal.

    A terminal is not forwarded (the command reads /dev/null, as before): a typist wants
    ``microvm shell``, and ``microvm run -- cat`` must not wait for a ^D nobody expects.
    """
    try:
        return stream is not None and not os.isatty(stream.fileno())
    except (OSError, ValueError):  # closed (no stdin at all) or not a real descriptor
        return False


def _forward_stdin(proc: Process, fd: int) -> None:
    """Copy our standard input to the command's, byte-exact; our end of input ends its input.

    Runs in a daemon thread: a command that exits without reading everything leaves it
    blocked in read(), which must not keep us alive. Chunks of 64 KiB: the protocol's
    credit window, not our memory, bounds what is in flight.
    """
    from pytest_microvm.errors import MicroVMError

    try:
        while data := os.read(fd, 1 << 16):
            proc.write(data)
        proc.close_stdin()
    except (OSError, MicroVMError):
        pass  # the command ended or the VM went away: its result says what happened


def cmd_run(args: argparse.Namespace) -> int:
    """Boot a VM, run one command with its output streamed as it comes, power off."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        print("error: nothing to run: microvm run [options] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    from pytest_microvm.machine.snapshot.policy import Templates

    config = _vm_config(args, keep=args.keep)
    with Templates(args.cache_dir).start(config, name="run") as vm:
        if vm.choice and vm.choice.accel == "tcg":
            print(f"microvm: running under TCG ({vm.choice.why})", file=sys.stderr)
        forward = not args.no_stdin and _pipe_or_file(sys.stdin)
        proc = vm.start_process(command, stdin=forward, timeout=args.timeout)
        if forward:
            import threading

            threading.Thread(target=_forward_stdin, args=(proc, sys.stdin.fileno()), daemon=True).start()
        result = _stream(proc)
        if args.keep:
            print(f"microvm: the VM stays up; reach it with: microvm attach {vm.workdir}", file=sys.stderr)
    if result.timed_out:
        print(f"microvm: the command timed out after {args.timeout}s", file=sys.stderr)
    return _exit_status(result)


def _terminal_size() -> tuple[int, int]:
    import shutil

    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


def cmd_shell(args: argparse.Namespace) -> int:
    """Boot a VM and give an interactive shell on a terminal carried by the agent."""
    from pytest_microvm.machine.snapshot.policy import Templates

    with Templates(args.cache_dir).start(_vm_config(args), name="shell") as vm:
        accel = vm.choice.accel if vm.choice else "?"
        print(f"microvm: shell in a {accel} guest; exit or ^D leaves (the VM is removed)", file=sys.stderr)
        return _interactive_shell(lambda **kw: vm.start_process(["/bin/sh", "-i"], **kw))


def _interactive_shell(start: Callable[..., Process]) -> int:
    """Run a guest shell on a terminal, with this terminal in raw mode; return its status."""
    import contextlib
    import select
    import termios
    import threading
    import tty

    from pytest_microvm.errors import MicroVMError

    interactive = sys.stdin.isatty()
    env = {"TERM": os.environ.get("TERM", "xterm"), "PS1": "microvm:\\w# "}
    proc = start(env=env, cwd="/root", pty=_terminal_size())
    saved = termios.tcgetattr(sys.stdin.fileno()) if interactive else None
    previous_winch = signal.signal(signal.SIGWINCH, lambda *_: proc.resize(*_terminal_size()))
    stop = threading.Event()

    def forward_stdin() -> None:
        # Raw mode: every key (^C, ^Z, arrows) reaches the guest's terminal as typed.
        fd = sys.stdin.fileno()
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(fd, 4096)
            with contextlib.suppress(MicroVMError):
                proc.write(data or b"\x04", timeout=10)  # our end of input: ^D for the guest shell
            if not data:
                return

    try:
        if saved is not None:
            tty.setraw(sys.stdin.fileno())
        threading.Thread(target=forward_stdin, daemon=True).start()
        out = sys.stdout.buffer
        while (chunk := proc.read()) is not None:
            out.write(chunk[1])
            out.flush()
        result = proc.wait()
    finally:
        stop.set()
        signal.signal(signal.SIGWINCH, previous_winch)
        if saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    return _exit_status(result)


def _kept_state(path: str) -> tuple[Path, dict[str, Any]]:
    """The vm.json of a kept VM (given it or its directory); MicroVMError if unreadable."""
    import json
    from pathlib import Path

    from pytest_microvm.errors import MicroVMError

    state_path = Path(path)
    if state_path.is_dir():
        state_path = state_path / "vm.json"
    try:
        return state_path, dict(json.loads(state_path.read_text()))
    except (OSError, ValueError) as exc:
        raise MicroVMError(f"cannot read the VM state {state_path}: {exc}") from None


def _is_process_of(pid: object, directory: Path) -> bool:
    """True if ``pid`` runs and its command line names ``directory``: a kept VM's QEMU and
    backend do (console and sockets live there), a recycled pid almost surely does not."""
    from pathlib import Path

    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return os.fsencode(directory) in cmdline


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a kept VM: its QEMU and vsock backend, then its directories."""
    import contextlib
    import shutil
    from pathlib import Path

    from pytest_microvm import _wait

    state_path, state = _kept_state(args.state)
    workdir, sockets = state_path.parent, Path(str(state.get("sockets") or state_path.parent))
    channel = state.get("channel") or {}
    pids = [
        int(str(pid))
        for pid in (state.get("qemu_pid"), channel.get("backend_pid"))
        if pid and (_is_process_of(pid, workdir) or _is_process_of(pid, sockets))
    ]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    _wait.until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids) or None, time.monotonic() + 5, 0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for directory in {workdir, sockets}:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"microvm: stopped {state.get('name', 'vm')} ({len(pids)} processes) and removed {workdir}", file=sys.stderr)
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    """Reach a VM left running (--microvm-keep-on-failure, run --keep): a shell, or one command."""
    from pathlib import Path

    from pytest_microvm.channel import reopen_listener
    from pytest_microvm.client import connect_agent

    _state_path, state = _kept_state(args.state)
    pid = state.get("qemu_pid")
    if not pid or not Path(f"/proc/{pid}").exists():
        print(f"error: the VM is gone (QEMU pid {pid} is not running)", file=sys.stderr)
        return 1
    with (
        reopen_listener(state.get("channel") or {}, int(state["agent_port"])) as listener,
        connect_agent(listener, token=str(state["token"]), timeout=args.timeout, name="attach") as agent,
    ):
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not command:
            print(f"microvm: attached to {state.get('name', 'vm')} (QEMU pid {pid}); exit leaves it running",
                  file=sys.stderr)  # fmt: skip
            return _interactive_shell(lambda **kw: agent.start(["/bin/sh", "-i"], **kw))
        return _exit_status(_stream(agent.start(command)))


def cmd_doctor(args: argparse.Namespace) -> int:
    """What this host can do for microVMs, what will be used, and how to fix what is missing."""
    import shutil

    from pytest_microvm import arch as arches
    from pytest_microvm.cache import cache_dir
    from pytest_microvm.errors import ImageError, MicroVMError
    from pytest_microvm.image.kernel_build import check_build_tools
    from pytest_microvm.image.sources import describe_kernel
    from pytest_microvm.machine import choose, detect_host

    values = cli_values(args, DOCTOR)
    guest = arches.get(values["arch"])
    native = detect_host()
    host = native.for_arch(guest.name)
    ok = True

    def line(good: bool, what: str, detail: str, fix: str = "") -> None:
        print(f"[{'ok' if good else '--'}] {what:<12} {detail}")
        if fix and not good:
            print(f"{'':18}fix: {fix}")

    # Every architecture: what runs it here (KVM only for the host's own, TCG for others).
    for arch in arches.ARCHES.values():
        report = native.for_arch(arch.name)
        how = "KVM" if report.kvm.usable else "TCG emulation (slower)"
        detail = f"{report.qemu} ({report.qemu_version}); runs under {how}" if report.qemu else "no QEMU"
        line(report.qemu is not None, f"{arch.name}", detail, f"apt-get install {arch.qemu_package}")
        if not arch.native:
            tools = [*arch.compilers()[:1], arch.user_emulator() or ""]
            missing = [t for t in tools if t and shutil.which(t) is None]
            line(
                not missing,
                "",
                "image build: "
                + (f"needs {', '.join(missing)}" if missing else "cross compiler and user-mode emulator installed"),
                f"apt-get install {arch.cross_packages} qemu-user-static",
            )
            ok &= arch is not guest or not missing
    print(f"guests below: {guest.name}" + ("" if guest.native else f" (on this {native.arch} host)"))
    ok &= host.qemu is not None
    line(host.kvm.usable, "KVM", host.kvm.reason, "hardware virtualisation, /dev/kvm passed in, the kvm group")
    line(host.vhost_vsock.usable, "vhost-vsock", host.vhost_vsock.reason,
         "modprobe vhost_vsock (without it the userspace backend is used: it works, a bit slower)")  # fmt: skip
    try:
        line(True, "will use", choose(host, values["accel"], values["vsock"]).why)
    except MicroVMError as exc:
        line(False, "will use", str(exc))
        ok = False
    cache = cache_dir(values["cache-dir"])
    line(True, "cache", str(cache))
    kernels = kernel_matrix(values)
    for kernel in kernels:
        label = "kernel" if len(kernels) == 1 else f"kernel {kernel}"
        described = describe_kernel(kernel, cache, guest)
        available = not described.startswith(("unknown", "none"))
        line(available, label, described, "apt-get update, or --kernel source, or --kernel PATH")
        ok &= available
    if "source" in kernels:
        try:
            check_build_tools(guest)
            line(True, "kernel build", "make, gcc, flex, bison, bc and libelf-dev are installed")
        except ImageError as exc:
            line(False, "kernel build", str(exc))
            ok = False
    for tool, package in (("cc", "gcc libc6-dev"), ("busybox", "busybox-static")):
        found = shutil.which(tool)
        line(found is not None, tool, found or "not found", f"apt-get install {package}")
        ok &= found is not None
    if host.accel == "tcg":
        print("note: without usable KVM, guests run under TCG emulation: boots take seconds, not a fraction")
    return 0 if ok else 1


def cmd_cache_dir(args: argparse.Namespace) -> int:
    from pytest_microvm.cache import cache_dir

    print(cache_dir(args.cache_dir))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="microvm", description="Throw-away QEMU microVMs for tests.")
    ap.add_argument("--version", action="version", version=f"pytest-microvm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="build and check the guest image").add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("build", cmd_image_build, "build the guest image (or find it in the cache) and print its paths"),
        ("check", cmd_image_check, "build the image, boot it, and check the agent starts as PID 1"),
    ):
        p = image.add_parser(name, help=text, description=text)
        add_cli_options(p, IMAGE)
        if name == "check":
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent (default 60)")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "run",
        help="boot a VM, run a command in it, stream its output, exit with its status",
        description="Boot a throw-away VM, run CMD in it with stdout and stderr streamed, power it off, "
        "and exit with CMD's exit code (128+N if it died by signal N).",
    )
    add_cli_options(p, VM)
    p.add_argument("--timeout", type=float, default=None, help="kill the command after this many seconds")
    p.add_argument("--keep", action="store_true", help="leave the VM running afterwards (reach it: microvm attach)")
    p.add_argument(
        "-n",
        "--no-stdin",
        action="store_true",
        help="do not read standard input (as ssh -n): CMD reads /dev/null. Without it a pipe or file on "
        "stdin is forwarded byte-exact and its end closes CMD's stdin; a terminal is never read",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("shell", help="boot a VM and open an interactive shell in it (removed on exit)")
    add_cli_options(p, VM)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("attach", help="reach a VM kept running by --microvm-keep-on-failure: a shell or a command")
    p.add_argument("state", help="the kept VM's vm.json, or its directory (the failure report names it)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent to reconnect")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="[-- CMD ARGS...] (default: an interactive shell)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("doctor", help="what this host can do, what will be used, and how to fix what is missing")
    add_cli_options(p, DOCTOR)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("stop", help="stop a kept VM (QEMU and the vsock backend) and remove its directory")
    p.add_argument("state", help="the kept VM's vm.json, or its directory")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("cache-dir", help="print the cache directory")
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_cache_dir)
    return ap


def _exit_on_signal(signum: int, _frame: object) -> None:
    # SIGTERM (a script stopping us) and SIGHUP (the terminal closed) unwind like Ctrl-C:
    # the VM's context manager stops it and removes its directory on the way out.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    args = parser().parse_args(argv)
    from pytest_microvm.errors import MicroVMError

    try:
        return int(args.func(args))
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MicroVMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
