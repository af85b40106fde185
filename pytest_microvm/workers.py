"""xdist workers inside VMs (``--microvm-workers N``): every test runs in a guest.

Owns the command that starts one worker VM, and how a process tells that it runs in a
guest. Nothing here speaks to the worker: xdist's own execnet ``popen`` gateway does. Its
spec takes the Python command to start (``popen//python=CMD``; execnet appends ``-u -c
<bootstrap>`` and talks to it over stdin and stdout), and ``microvm run`` with its stdin
forwarded is such a command. So results, captured output and tracebacks come back as
xdist always brings them, and a crashed worker is reported as xdist reports one.

A worker VM has the host's userland (``rootfs="host"``: the same Python, pytest and
plugins at the same paths, read-only under a tmpfs overlay) and the rootdir shared
read-write at the same path, so what workers write there (coverage data files, files a
test leaves for the host) reaches the host; ``--junitxml`` is written by the controller
on the host anyway.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_microvm.options import kernel_matrix, modules_for

# A worker runs pytest and the test code: more than a command needs (256 MiB by default).
WORKER_MEMORY_MIB = 1024
CMDLINE = "/proc/cmdline"
GUEST_MARK = "microvm.token="  # every guest this harness boots has it on its kernel command line
# Set for the worker's Python by its command: a worker VM, not any guest that runs pytest
# (scripts/nested runs the kernel-path tests in a guest on purpose, under nested TCG).
WORKER_ENV = "PYTEST_MICROVM_WORKER_VM"


def in_guest(cmdline: str | os.PathLike[str] = CMDLINE) -> bool:
    """Whether this process runs inside a pytest-microvm guest (a worker VM, or any VM of
    ours): its kernel command line carries the agent's ``microvm.token``."""
    try:
        return GUEST_MARK in Path(cmdline).read_text()
    except OSError:
        return False


def in_worker_vm(cmdline: str | os.PathLike[str] = CMDLINE) -> bool:
    """Whether this process is a ``--microvm-workers`` worker, in its VM."""
    return os.environ.get(WORKER_ENV) == "1" and in_guest(cmdline)


def shared_dirs(rootdir: Path, invocation_dir: Path) -> list[Path]:
    """The host directories a worker VM gets read-write at the same path: the rootdir, and
    the directory pytest was started in if it lies outside it."""
    dirs = [rootdir.resolve()]
    here = invocation_dir.resolve()
    if not here.is_relative_to(dirs[0]):
        dirs.append(here)
    return dirs


def python_dirs(prefix: str = sys.prefix, path: Sequence[str] = tuple(sys.path)) -> list[Path]:
    """The directories of this Python's environment that a host-userland guest would not see
    (under its own /tmp or /run: a CI clone in /tmp and its venv), to share read-only at the
    same path. Everywhere else the guest sees the host's files as they are."""
    from pytest_microvm.machine.config import is_guest_own

    found = sorted({Path(p).resolve() for p in (prefix, *path) if p and os.path.isdir(p) and is_guest_own(p)})
    outermost: list[Path] = []
    for d in found:  # sorted: a parent comes before what lies beneath it
        if not any(d.is_relative_to(o) for o in outermost):
            outermost.append(d)
    return outermost


def worker_command(
    values: Mapping[str, Any], shares: Sequence[Path], python: str = sys.executable, readonly: Sequence[Path] = ()
) -> list[str]:
    """``microvm run`` booting one worker VM and starting ``python`` in it, with this run's
    VM options (``values``, converted): accel, vsock, the first kernel of the matrix, cache.
    ``shares`` are shared read-write, ``readonly`` (not beneath one of those) read-only."""
    argv = [python, "-m", "pytest_microvm.cli", "run", "--rootfs", "host"]
    memory = max(int(values.get("memory") or 0), WORKER_MEMORY_MIB)
    argv += ["--memory", str(memory)]
    for name in ("accel", "vsock", "cache-dir", "boot-timeout"):
        if values.get(name) is not None:
            argv += [f"--{name}", str(values[name])]
    kernel = kernel_matrix(values)[0]
    if kernel is not None:
        argv += ["--kernel", kernel]
    modules = modules_for(values, kernel)
    if modules is not None:
        argv += ["--modules", modules]
    for path in shares:
        argv += ["--share", f"{path}:{path}"]
    for path in readonly:
        if not any(path.is_relative_to(p) for p in shares):
            argv += ["--share", f"{path}:{path}:ro"]
    return [*argv, "--", "env", f"{WORKER_ENV}=1", python]


def gateway_spec(command: Sequence[str]) -> str:
    """The execnet spec that starts a worker with ``command`` as its Python."""
    joined = shlex.join(command)
    if "//" in joined:  # execnet splits a spec at "//"
        raise ValueError(f"a worker VM's command cannot contain '//': {joined}")
    return f"popen//python={joined}"


def nested_vm_error(accel_option: str | None, accel: str) -> str | None:
    """Why a test may not boot a VM here, or None: inside a worker VM without KVM a VM would
    run under TCG inside TCG (or inside KVM's emulation), which only an explicit
    ``--microvm-accel tcg`` asks for."""
    if accel != "tcg" or accel_option == "tcg" or not in_worker_vm():
        return None
    return (
        "this test boots a VM, and it runs inside a VM (a --microvm-workers worker) without usable KVM: "
        "give the worker VMs nested KVM (a KVM host with nested virtualization), run the tests that boot "
        "VMs without --microvm-workers, or pass --microvm-accel tcg to boot them under nested TCG (very slow)"
    )
