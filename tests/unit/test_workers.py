"""The worker-VM command and checks of --microvm-workers, without booting (the integration
test boots real worker VMs)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pytest_microvm import workers
from pytest_microvm.options import BY_NAME


def test_in_guest_reads_the_kernel_command_line(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 microvm.token=abc microvm.root=9p:hostroot\n")
    assert workers.in_guest(cmdline)
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n")
    assert not workers.in_guest(cmdline)
    assert not workers.in_guest(tmp_path / "missing")


def test_the_rootdir_and_an_outside_invocation_dir_are_shared(tmp_path: Path) -> None:
    root, sub, other = tmp_path / "repo", tmp_path / "repo" / "tests", tmp_path / "elsewhere"
    for d in (sub, other):
        d.mkdir(parents=True)
    assert workers.shared_dirs(root, sub) == [root]
    assert workers.shared_dirs(root, other) == [root, other]


def test_the_worker_command_is_microvm_run_of_this_python_with_the_runs_options(tmp_path: Path) -> None:
    values = {
        "accel": "tcg",
        "vsock": "userspace",
        "kernel": BY_NAME["kernel"].convert("source,debian"),
        "memory": 256,
        "cache-dir": "/c",
    }
    argv = workers.worker_command(values, [tmp_path], python="/venv/bin/python")
    assert argv[:5] == ["/venv/bin/python", "-m", "pytest_microvm.cli", "run", "--rootfs"]
    # execnet appends -u -c <bootstrap>; the variable tells a worker VM from any other guest.
    assert argv[-4:] == ["--", "env", f"{workers.WORKER_ENV}=1", "/venv/bin/python"]
    pairs = dict(zip(argv[4:-4:2], argv[5:-4:2], strict=True))
    assert pairs["--rootfs"] == "host"
    assert pairs["--memory"] == str(workers.WORKER_MEMORY_MIB)  # a worker needs more than a command
    assert (pairs["--accel"], pairs["--vsock"], pairs["--cache-dir"]) == ("tcg", "userspace", "/c")
    assert pairs["--kernel"] == "source"  # the first of a matrix: the workers' own kernel
    assert pairs["--share"] == f"{tmp_path}:{tmp_path}"
    spec = workers.gateway_spec(argv)
    assert spec.startswith("popen//python=") and shlex.split(spec.removeprefix("popen//python=")) == argv
    with pytest.raises(ValueError, match="cannot contain '//'"):
        workers.gateway_spec(["/x//y"])


def test_a_worker_vm_is_a_guest_with_the_workers_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 microvm.token=abc\n")
    monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    assert workers.in_guest(cmdline) and not workers.in_worker_vm(cmdline)  # e.g. scripts/nested's L1
    monkeypatch.setenv(workers.WORKER_ENV, "1")
    assert workers.in_worker_vm(cmdline)
    assert not workers.in_worker_vm(tmp_path / "missing")  # the variable alone, on a host: not a VM


def test_a_python_environment_under_the_guests_own_tmp_is_shared_read_only(tmp_path: Path) -> None:
    checkout = tmp_path / "ci" / "main"  # a CI clone in /tmp, with its venv and editable source
    (checkout / ".venv" / "lib").mkdir(parents=True)
    (checkout / "src").mkdir()
    dirs = workers.python_dirs(str(checkout / ".venv"), [str(checkout), str(checkout / "src"), "/usr/lib/python3", ""])
    assert dirs == [checkout.resolve()]  # one share covers the venv and the source; /usr the guest sees
    argv = workers.worker_command({}, [tmp_path / "rootdir"], python="/p", readonly=dirs)
    assert f"{checkout.resolve()}:{checkout.resolve()}:ro" in argv
    inside = workers.worker_command({}, [tmp_path], python="/p", readonly=dirs)
    assert not any(a.endswith(":ro") for a in inside)  # beneath a read-write share already


def test_a_vm_inside_a_worker_vm_needs_kvm_or_an_explicit_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "in_worker_vm", lambda *a: True)
    message = workers.nested_vm_error(None, "tcg")
    assert message is not None and "--microvm-accel tcg" in message and "nested KVM" in message
    assert workers.nested_vm_error("auto", "tcg") is not None
    assert workers.nested_vm_error("tcg", "tcg") is None  # asked for: nested TCG
    assert workers.nested_vm_error(None, "kvm") is None  # nested KVM in the worker VM
    monkeypatch.setattr(workers, "in_worker_vm", lambda *a: False)
    assert workers.nested_vm_error(None, "tcg") is None  # on the host, or another guest: TCG as ever
