"""The real agent binary against the real client over a Unix socket: the exec path.

No VM here: the agent runs on the host, which is exactly how it runs in the guest
except for the socket family. These tests pin the behaviour docs/protocol.md promises.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pytest_microvm import AgentError, CommandError, CommandTimeout
from pytest_microvm.client import AgentClient
from tests.agent_harness import HostAgent, children_of, host_agent, rss_kib
from tests.signals import ignored


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes(client: AgentClient, code: int) -> None:
    r = client.run(["sh", "-c", f"exit {code}"])
    assert (r.exit_code, r.signal, r.timed_out) == (code, 0, False)
    assert r.ok is (code == 0)


def test_death_by_signal(client: AgentClient) -> None:
    r = client.run(["sh", "-c", "kill -TERM $$"])
    assert (r.exit_code, r.signal, r.timed_out) == (-1, signal.SIGTERM, False)
    assert "SIGTERM" in r.describe()


def test_stdout_and_stderr_are_separate_and_byte_exact(client: AgentClient) -> None:
    # printf with octal escapes: NUL, 0xff, no trailing newline, on both streams.
    r = client.run(["sh", "-c", r"printf 'out\000\377x'; printf 'err\001\200' >&2; exit 3"])
    assert r.stdout == b"out\x00\xffx"
    assert r.stderr == b"err\x01\x80"
    assert r.exit_code == 3


def test_shell_string_and_argv_forms(client: AgentClient) -> None:
    assert client.run("echo $((6*7))").stdout == b"42\n"
    # argv is passed verbatim: no shell splits or expands it.
    assert client.run(["echo", "a  b", "$HOME"]).stdout == b"a  b $HOME\n"


def test_env_is_added_to_the_base_environment(client: AgentClient) -> None:
    r = client.run(["sh", "-c", 'echo "$GREETING|$HOME|$PATH"'], env={"GREETING": "hi there"})
    assert r.stdout == b"hi there|/root|/usr/sbin:/usr/bin:/sbin:/bin\n"
    r = client.run(["sh", "-c", 'echo "$HOME"'], env={"HOME": "/elsewhere"})
    assert r.stdout == b"/elsewhere\n"


def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    assert client.run(["pwd"], cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    assert client.run(["pwd"]).stdout == b"/\n"


def test_missing_cwd_is_an_agent_error(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        client.run(["true"], cwd="/no/such/dir")
    assert info.value.code == 2


def test_missing_program_is_an_agent_error_naming_it(client: AgentClient) -> None:
    with pytest.raises(AgentError, match="no-such-program-xyz") as info:
        client.run(["no-such-program-xyz"])
    assert info.value.code == 2  # ENOENT


def test_stdin(client: AgentClient) -> None:
    data = os.urandom(300_000)  # more than one STDIN window: exercises stdin credit
    r = client.run(["sha256sum"], stdin=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_stdin_is_dev_null_by_default(client: AgentClient) -> None:
    assert client.run(["cat"], timeout=10).stdout == b""


def test_stdin_to_a_command_that_does_not_read_it(client: AgentClient) -> None:
    # The command exits without reading: the rest of the input is dropped, no hang.
    r = client.run(["true"], stdin=os.urandom(2_000_000), timeout=20)
    assert r.exit_code == 0


def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    start = time.monotonic()
    # The child sleep holds stdout open: only killing the whole group ends the job.
    r = client.run(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout=0.5)
    assert r.timed_out and r.signal == signal.SIGKILL and r.stdout == b""
    assert time.monotonic() - start < 10


def test_check_raises_command_error_with_the_result(client: AgentClient) -> None:
    with pytest.raises(CommandError) as info:
        client.run("echo boom >&2; exit 4", check=True)
    assert info.value.result.exit_code == 4
    assert "boom" in str(info.value)


def test_probe(client: AgentClient) -> None:
    assert 0 < client.probe() < 5


def test_100_mib_of_output_with_flat_agent_rss(client: AgentClient, module_agent: HostAgent) -> None:
    """Stream 100 MiB through a Process read slowly, sampling the agent's RSS."""
    total = 100 * 1024 * 1024
    proc = client.start(["head", "-c", str(total), "/dev/zero"])
    received = 0
    samples = []
    while (chunk := proc.read(timeout=30)) is not None:
        assert chunk[0] == "stdout"
        received += len(chunk[1])
        if received % (8 * 1024 * 1024) < len(chunk[1]):
            samples.append(rss_kib(module_agent.pid))
    assert proc.wait().exit_code == 0
    assert received == total
    # Flat: fixed buffers, no growth with the amount streamed.
    assert max(samples) < 16 * 1024, samples
    assert max(samples[1:]) - samples[1] < 2048, samples


def test_unread_output_stalls_the_command_not_the_agent_memory(client: AgentClient, module_agent: HostAgent) -> None:
    """A Process nobody reads: the agent stops at the credit window, RSS stays put."""
    proc = client.start(["head", "-c", str(50 * 1024 * 1024), "/dev/zero"])
    time.sleep(1.0)
    before = rss_kib(module_agent.pid)
    time.sleep(1.0)
    assert rss_kib(module_agent.pid) - before < 512
    assert not proc.done  # blocked in write(), waiting for us
    # The other jobs on the connection are not blocked by the stalled one.
    assert client.run(["echo", "still here"], timeout=10).stdout == b"still here\n"
    proc.kill()
    result = proc.wait(timeout=10)
    assert result.signal == signal.SIGKILL


def test_16_commands_at_once(client: AgentClient) -> None:
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            r = client.run(["sh", "-c", f"sleep 0.5; echo job{i}; echo e{i} >&2"], timeout=30)
            assert r.stderr == f"e{i}\n".encode()
            results[i] = r.stdout
        except BaseException as exc:
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: f"job{i}\n".encode() for i in range(16)}
    # They ran concurrently: 16 x 0.5 s in sequence would take 8 s.
    assert time.monotonic() - start < 6


def test_more_jobs_than_the_agent_limit_queue_on_the_host(client: AgentClient) -> None:
    procs = [client.start(["sleep", "0.2"]) for _ in range(64)]
    # A 65th waits for a slot instead of being refused.
    extra = threading.Thread(target=lambda: client.run(["true"], timeout=30))
    extra.start()
    for p in procs:
        assert p.wait(timeout=30).exit_code == 0
    extra.join(30)
    assert not extra.is_alive()


def test_streaming_process_stdin_and_output(client: AgentClient) -> None:
    proc = client.start(["cat"], stdin=True)
    proc.write(b"hello ")
    assert proc.read(timeout=10) == ("stdout", b"hello ")
    proc.write(b"world")
    proc.close_stdin()
    result = proc.wait(timeout=10)
    assert result.stdout == b"world" and result.exit_code == 0


def test_kill_a_running_process(client: AgentClient) -> None:
    proc = client.start(["sleep", "60"])
    proc.kill(signal.SIGINT)
    result = proc.wait(timeout=10)
    assert result.signal == signal.SIGINT


def test_read_timeout(client: AgentClient) -> None:
    proc = client.start(["sleep", "5"])
    with pytest.raises(CommandTimeout):
        proc.read(timeout=0.2)
    proc.kill()
    proc.wait(timeout=10)


def test_file_put_get_round_trip(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    remote = str(tmp_path / "remote.bin")
    client.put_file(src, remote)
    assert os.stat(remote).st_mode & 0o777 == 0o640
    # The agent's own view of the content, then the copy back.
    digest = client.run(["sha256sum", remote]).stdout.split()[0].decode()
    assert digest == hashlib.sha256(data).hexdigest()
    assert client.get_file(remote, back) == len(data)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    client.write_file(remote, b"small", mode=0o600)
    assert client.read_file(remote) == b"small"


def test_file_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        client.read_file("/no/such/file")
    assert info.value.code == 2
    with pytest.raises(AgentError) as info:
        client.read_file(str(tmp_path))
    assert info.value.code == 21  # EISDIR
    with pytest.raises(AgentError):
        client.write_file("/no/such/dir/file", b"x")
    dest = tmp_path / "partial"
    with pytest.raises(AgentError):
        client.get_file("/no/such/file", dest)
    assert not dest.exists()  # no partial file left behind


def test_invalid_arguments_are_refused_before_sending(client: AgentClient) -> None:
    with pytest.raises(ValueError, match="NUL"):
        client.run(["echo", "a\0b"])
    with pytest.raises(ValueError, match="empty"):
        client.run([])
    with pytest.raises(ValueError, match="environment"):
        client.run(["true"], env={"A=B": "c"})
    assert client.run(["true"]).ok  # the connection is unharmed


def test_commands_leave_no_processes_behind(client: AgentClient, module_agent: HostAgent) -> None:
    for _ in range(20):
        client.run(["true"])
    deadline = time.monotonic() + 5
    while children_of(module_agent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_of(module_agent.pid) == []


def test_program_is_looked_up_in_the_commands_path(client: AgentClient, tmp_path: Path) -> None:
    # The search must use the PATH the command gets, not the agent's own (as PID 1 the
    # agent's environment is the kernel's, without /sbin).
    tool = tmp_path / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(0o755)
    assert client.run(["only-here"], env={"PATH": f"{tmp_path}:/bin:/usr/bin"}).stdout == b"found\n"


def test_path_search_skips_files_that_are_not_executable(client: AgentClient, tmp_path: Path) -> None:
    # As execvp does: a match without the execute bit is passed over for a later one,
    # and if that was the only match the error is EACCES, not ENOENT.
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()
    (first / "tool").write_text("#!/bin/sh\necho first\n")  # not executable
    (second / "tool").write_text("#!/bin/sh\necho second\n")
    (second / "tool").chmod(0o755)
    assert client.run(["tool"], env={"PATH": f"{first}:{second}:/bin"}).stdout == b"second\n"
    with pytest.raises(AgentError, match="tool") as info:
        client.run(["tool"], env={"PATH": f"{first}:/bin"})
    assert info.value.code == 13  # EACCES


def test_relative_program_and_path_entries_are_relative_to_cwd(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    tool = tmp_path / "bin" / "rel"
    tool.write_text("#!/bin/sh\necho relative\n")
    tool.chmod(0o755)
    assert client.run(["./bin/rel"], cwd=str(tmp_path)).stdout == b"relative\n"
    assert client.run(["rel"], cwd=str(tmp_path), env={"PATH": "bin:/bin"}).stdout == b"relative\n"


def test_a_file_without_an_interpreter_line_is_not_run_by_sh(client: AgentClient, tmp_path: Path) -> None:
    # protocol.md: unlike execvp there is no /bin/sh fallback; the error says ENOEXEC.
    script = tmp_path / "no-shebang"
    script.write_text("echo ran\n")
    script.chmod(0o755)
    with pytest.raises(AgentError, match="no-shebang") as info:
        client.run([str(script)])
    assert info.value.code == 8  # ENOEXEC


@pytest.mark.parametrize("pty", [None, (24, 80)])
def test_commands_inherit_no_descriptor_but_their_stdio(client: AgentClient, pty: tuple[int, int] | None) -> None:
    proc = client.start(["sh", "-c", "ls /proc/$$/fd"], pty=pty)
    assert proc.wait(timeout=30).stdout.split() == [b"0", b"1", b"2"]


def test_commands_get_default_sigpipe_and_an_empty_signal_mask(client: AgentClient) -> None:
    # The agent ignores SIGPIPE and blocks the signals it reads through a signalfd;
    # neither may leak into commands (`yes | head` must end by SIGPIPE, not spin).
    status = client.run(["cat", "/proc/self/status"], check=True).stdout.decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["SigBlk"], 16) == 0
    assert int(fields["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0
    assert client.run("yes | head -c 3", timeout=10).stdout == b"y\ny"


def test_commands_get_default_dispositions_whatever_the_agent_inherited(agent_binary: Path, tmp_path: Path) -> None:
    # As when the suite runs as a script's background job: the agent inherits signals
    # ignored. Its commands must not (a SIGINT sent to them must end them).
    inherited = ["INT", "QUIT", "HUP", "USR1"]
    wrapper = subprocess.run(["sh", "-c", f"trap '' {' '.join(inherited)}; exec cat /proc/self/status"],
                             capture_output=True, check=True)  # fmt: skip
    assert ignored(wrapper.stdout) >= {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1}  # the setup holds
    with host_agent(agent_binary, tmp_path, ignore=inherited) as agent, agent.client() as client:
        status = client.run(["cat", "/proc/self/status"], check=True).stdout
        assert ignored(status) == set()
        r = client.run(["sh", "-c", "kill -INT $$; echo survived"], timeout=10)
        assert (r.signal, r.stdout) == (signal.SIGINT, b"")


def test_pty_gives_a_controlling_terminal_with_size_and_interrupt(client: AgentClient) -> None:
    proc = client.start(["sh", "-c", "stty size; tty; read line; echo got:$line"], pty=(33, 101))
    out = b""
    while b"/dev/pts/" not in out:
        chunk = proc.read(timeout=10)
        assert chunk is not None and chunk[0] == "stdout"  # a terminal has one output stream
        out += chunk[1]
    assert b"33 101" in out
    proc.write(b"hello\r")
    rest = proc.wait(timeout=10)
    assert b"got:hello" in rest.stdout and rest.exit_code == 0
    # ^C through the terminal's line discipline interrupts the foreground command.
    sleeper = client.start(["sh", "-c", "sleep 30; echo not-interrupted"], pty=(24, 80))
    time.sleep(0.3)
    start = time.monotonic()
    sleeper.write(b"\x03")
    result = sleeper.wait(timeout=10)
    assert result.signal == signal.SIGINT and time.monotonic() - start < 5


def test_resize_reaches_the_terminal(client: AgentClient) -> None:
    proc = client.start(["sh", "-c", "read x; stty size"], pty=(10, 20))
    proc.resize(50, 132)
    time.sleep(0.2)
    proc.write(b"go\r")
    assert b"50 132" in proc.wait(timeout=10).stdout
