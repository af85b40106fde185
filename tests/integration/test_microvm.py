"""MicroVM with real QEMU guests (TCG + the userspace vsock here): commands, files, pause,
and every way a guest can go wrong."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import BootError, GuestError, GuestImage, MicroVM, Runstate, VMConfig
from pytest_microvm.errors import AgentError


@pytest.fixture(scope="module")
def vm(microvm_image: GuestImage) -> Iterator[MicroVM]:
    with MicroVM(VMConfig(image=microvm_image, memory_mib=256)) as machine:
        yield machine


def test_the_readme_example(vm: MicroVM) -> None:
    r = vm.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)


def test_byte_exact_binary_output(vm: MicroVM) -> None:
    r = vm.run(r"printf 'a\000b\377'; printf '\001\002' >&2")
    assert (r.stdout, r.stderr, r.exit_code) == (b"a\x00b\xff", b"\x01\x02", 0)


def test_death_by_signal_and_timeout(vm: MicroVM) -> None:
    r = vm.run("kill -SEGV $$")
    assert (r.exit_code, r.signal) == (-1, signal.SIGSEGV)
    start = time.monotonic()
    r = vm.run(["sleep", "60"], timeout=1)
    assert r.timed_out and r.signal == signal.SIGKILL
    assert time.monotonic() - start < 20


def test_stdin_env_cwd(vm: MicroVM) -> None:
    data = os.urandom(100_000)
    assert vm.run(["sha256sum"], stdin=data).stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert vm.run('echo "$A-$B"', env={"A": "1", "B": "two"}).stdout == b"1-two\n"
    assert vm.run(["pwd"], cwd="/tmp").stdout == b"/tmp\n"


def test_commands_run_as_a_user_the_guest_just_got(vm: MicroVM) -> None:
    # The guest's own files, read when the command starts: a user added a moment ago is found.
    vm.run(
        "echo 'tester:x:1234:1234::/home/tester:/bin/sh' >> /etc/passwd && echo 'tester:x:1234:' >> /etc/group"
        " && echo 'audio:x:63:tester' >> /etc/group && mkdir -p /home/tester && chown 1234 /home/tester"
        " && mkdir -p /secret && chmod 700 /secret",
        check=True,
    )
    ids = "id -u; id -g; id -G; echo $HOME; touch /secret/x 2>&1 || echo refused"
    r = vm.run(ids, user="tester", check=True)
    assert r.stdout.decode().splitlines()[:4] == ["1234", "1234", "1234 63", "/home/tester"]
    assert r.stdout.decode().splitlines()[-1] == "refused"
    with pytest.raises(AgentError, match="user ghost: no such user in /etc/passwd"):
        vm.run("true", user="ghost")
    vm.default_user = "tester"  # what an OCI image's User sets: every command without user=
    try:
        assert vm.run("id -u").stdout == b"1234\n"
        assert vm.run("id -u", user="root").stdout == b"0\n"
    finally:
        vm.default_user = None


def test_ten_mib_of_output(vm: MicroVM) -> None:
    r = vm.run("head -c 10485760 /dev/urandom | tee /tmp/ten | sha256sum >&2; cat /tmp/ten", timeout=120)
    assert len(r.stdout) == 10 * 1024 * 1024
    assert hashlib.sha256(r.stdout).hexdigest() == r.stderr.split()[0].decode()


def test_file_round_trip(vm: MicroVM, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    src.chmod(0o751)
    vm.put_file(src, "/tmp/payload")
    assert vm.run(["stat", "-c", "%a", "/tmp/payload"]).stdout == b"751\n"
    back = tmp_path / "back"
    assert vm.get_file("/tmp/payload", back) == src.stat().st_size
    assert back.read_bytes() == src.read_bytes()


def test_twenty_commands_at_once(vm: MicroVM) -> None:
    out: dict[int, bytes] = {}

    def one(i: int) -> None:
        out[i] = vm.run(f"sleep 1; echo {i}", timeout=120).stdout

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert out == {i: f"{i}\n".encode() for i in range(20)}
    assert time.monotonic() - start < 15  # concurrent: 20 one-second sleeps in sequence take 20 s


def test_pause_and_resume(vm: MicroVM) -> None:
    vm.run("date +%s > /tmp/before")
    vm.pause()
    assert vm.status() == "paused" and vm.runstate is Runstate.PAUSED
    proc = vm.start_process(["echo", "queued"])
    time.sleep(1.0)
    assert not proc.done  # nothing runs while the guest is paused
    vm.resume()
    assert vm.status() == "running"
    assert proc.wait(timeout=60).stdout == b"queued\n"


def test_streaming_process(vm: MicroVM) -> None:
    proc = vm.start_process(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"])
    chunks = []
    while (chunk := proc.read(timeout=30)) is not None:
        chunks.append(chunk[1])
    assert b"".join(chunks) == b"1\n2\n3\n"
    assert proc.wait().exit_code == 0


def test_console_log_and_ready_time(vm: MicroVM) -> None:
    assert "running as PID 1" in vm.console()
    assert vm.ready_seconds is not None and vm.ready_seconds < vm.config.boot_timeout
    assert vm.choice is not None and vm.choice.vsock in ("userspace", "kernel")


# ---- things going wrong: each boots a VM of its own ------------------------------------


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_leaves_no_process_socket_or_directory(microvm_image: GuestImage) -> None:
    vm = MicroVM(VMConfig(image=microvm_image)).start()
    pids, workdir = vm.pids, vm.workdir
    assert len(pids) == 2 and all(alive(p) for p in pids)  # QEMU and the backend
    vm.stop()
    assert vm.runstate is Runstate.STOPPED
    assert not any(alive(p) for p in pids)
    assert workdir is not None and not workdir.exists()


def test_guest_panic_is_a_clear_error_quickly(microvm_image: GuestImage) -> None:
    with MicroVM(VMConfig(image=microvm_image)) as vm:
        start = time.monotonic()
        with pytest.raises(GuestError, match="kernel panicked") as info:
            vm.run("echo c > /proc/sysrq-trigger; sleep 60", timeout=90)
        assert time.monotonic() - start < 30
        assert "Kernel panic" in info.value.console_tail


def test_guest_that_never_connects_gives_boot_error_with_console(microvm_image: GuestImage) -> None:
    # The agent is told a port nobody listens on: it keeps retrying, the host keeps waiting.
    cfg = VMConfig(image=microvm_image, boot_timeout=15, kernel_cmdline=("microvm.port=9999",))
    vm = MicroVM(cfg)
    start = time.monotonic()
    with pytest.raises(BootError, match="did not connect within 15s") as info:
        vm.start()
    assert 15 <= time.monotonic() - start < 40
    assert "host is vsock 2:9999" in info.value.console_tail
    assert vm.runstate is Runstate.STOPPED and not any(alive(p) for p in vm.pids)


def test_qemu_dying_mid_run_is_reported(microvm_image: GuestImage) -> None:
    with MicroVM(VMConfig(image=microvm_image)) as vm:
        assert vm.qemu is not None and vm.qemu.pid is not None
        proc = vm.start_process(["sleep", "60"])
        os.kill(vm.qemu.pid, signal.SIGKILL)
        with pytest.raises(GuestError, match="QEMU exited with status -9"):
            vm._guard(lambda: proc.wait(timeout=30))


def test_a_deep_work_directory_still_gets_its_sockets(microvm_image: GuestImage, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # far past sockaddr_un's 108 bytes
    deep.mkdir(parents=True)
    vm = MicroVM(VMConfig(image=microvm_image, workdir=deep)).start()
    try:
        assert vm.workdir is not None and vm.workdir.parent == deep
        assert vm.run(["echo", "deep"]).stdout == b"deep\n"
        sockdir = vm._sockdir
        assert sockdir is not None and sockdir != vm.workdir
    finally:
        vm.stop()
    assert not sockdir.exists() and list(deep.iterdir()) == []


def test_qemu_refusing_its_arguments_is_a_boot_error_with_its_stderr(microvm_image: GuestImage) -> None:
    vm = MicroVM(VMConfig(image=microvm_image, qemu_args=("-no-such-option",)))
    start = time.monotonic()
    with pytest.raises(BootError, match="QEMU exited with status 1") as info:
        vm.start()
    assert "no-such-option" in info.value.qemu_stderr
    assert time.monotonic() - start < 30
    assert vm.runstate is Runstate.STOPPED
