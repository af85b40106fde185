"""Bad input on both ends: the client against a fake agent, the real agent against a fuzzing host.

Fakes are named as fakes: the "fake agent" here is a socketpair end this test writes
to. The agent side uses the real binary.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pytest_microvm import AgentError, ConnectionLost, HandshakeError, ProtocolError
from pytest_microvm import protocol as p
from pytest_microvm.client import AgentClient
from tests.agent_harness import HostAgent, drain, handshake_raw, host_agent, rss_kib

# ---- the client against a fake agent -------------------------------------------------


@contextlib.contextmanager
def fake_agent(token: str = "t") -> Iterator[tuple[AgentClient, socket.socket]]:
    host_end, agent_end = socket.socketpair()
    agent_end.sendall(p.encode_hello("fake", token))
    client = AgentClient.handshake(host_end, token="t", timeout=5)
    assert agent_end.recv(64) == p.encode_hello_ack()
    try:
        yield client, agent_end
    finally:
        client.close()
        agent_end.close()


def read_frame(sock: socket.socket) -> p.Frame:
    dec = p.FrameDecoder(p.FROM_HOST)
    while True:
        frames = dec.feed(sock.recv(65536))
        if frames:
            return frames[0]


def test_fake_agent_malformed_frame_fails_waiting_jobs_with_a_clear_error() -> None:
    with fake_agent() as (client, agent):
        errors: list[BaseException] = []

        def waiter() -> None:
            try:
                client.run(["true"])
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        job = read_frame(agent)
        agent.sendall(p.HEADER.pack(0, 42, 0, job.id))  # unknown type
        t.join(5)
        assert not t.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
        assert "unknown frame type 42" in str(errors[0])
        assert not client.connected
        # Later calls fail at once with the same error instead of hanging.
        with pytest.raises(ProtocolError, match="unknown frame type"):
            client.run(["true"])


def test_fake_agent_oversized_frame_is_rejected_without_waiting_for_the_payload() -> None:
    with fake_agent() as (client, agent):
        agent.sendall(p.HEADER.pack(0xFFFFFFFF, p.FrameType.STDOUT, 0, 1))
        deadline = time.monotonic() + 5
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not client.connected
        with pytest.raises(ProtocolError, match="MAX_PAYLOAD"):
            client.run(["true"])


def test_fake_agent_output_beyond_credit_is_a_protocol_error() -> None:
    with fake_agent() as (client, agent):
        proc = client.start(["yes"])
        job = read_frame(agent)
        chunk = p.frame(p.FrameType.STDOUT, job.id, b"x" * p.MAX_CHUNK)
        agent.sendall(chunk * (p.OUTPUT_WINDOW // p.MAX_CHUNK + 1))  # nobody read: no credit came back
        deadline = time.monotonic() + 5
        while client.connected and time.monotonic() < deadline:  # read nothing (reading returns credit)
            time.sleep(0.01)
        with pytest.raises(ProtocolError, match="beyond its credit"):
            while proc.read(timeout=5) is not None:
                pass


def test_fake_agent_closing_mid_command_is_connection_lost() -> None:
    with fake_agent() as (client, agent):
        proc = client.start(["sleep", "10"])
        read_frame(agent)
        agent.close()
        with pytest.raises(ConnectionLost):
            proc.wait(timeout=5)


def test_handshake_rejects_wrong_token_and_version() -> None:
    for hello, match in (
        (p.encode_hello("x", "wrong"), "wrong token"),
        (p.frame(p.FrameType.HELLO, 0, struct.pack(">HH", 9, 0) + b"\0\0\0\0\0\0\0\0"), "protocol 9"),
    ):
        host_end, agent_end = socket.socketpair()
        agent_end.sendall(hello)
        with pytest.raises(HandshakeError, match=match):
            AgentClient.handshake(host_end, token="right", timeout=5)
        assert agent_end.recv(64) == b""  # closed without a word
        agent_end.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=10), st.booleans())
def test_client_survives_arbitrary_bytes_from_the_agent(chunks: list[bytes], structured: bool) -> None:
    """Whatever the fake agent sends, the client ends in a clean, reported state."""
    with fake_agent() as (client, agent):
        proc = client.start(["x"])
        job = read_frame(agent)
        # The client hangs up at the first malformed frame, so later sends may fail.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                if structured and len(chunk) >= 2:
                    # A valid header for the live job with fuzzed type and payload.
                    agent.sendall(p.HEADER.pack(len(chunk) - 1, chunk[0] % 16, 0, job.id) + chunk[1:])
                else:
                    agent.sendall(chunk)
        agent.close()
        # ConnectionLost is a ProtocolError; AgentError answers a well-formed ERROR frame.
        with contextlib.suppress(ProtocolError, AgentError):
            proc.wait(timeout=5)
        assert client._reader.join(5) is None and not client._reader.is_alive()


# ---- the real agent against a fuzzing host -------------------------------------------


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (p.HEADER.pack(p.MAX_PAYLOAD + 1, p.FrameType.STDIN, 0, 1), "larger than MAX_PAYLOAD"),
        (p.HEADER.pack(0, 77, 0, 1), "unknown frame type"),
        (p.HEADER.pack(0, p.FrameType.STDIN, 4, 1), "flags"),
        (p.frame(p.FrameType.STDOUT, 1, b"x"), "misdirected"),
        (p.frame(p.FrameType.EXEC, 1, b"\0\0\0\0"), "too short"),
        (p.encode_exec(1, ["true"]) + b"", None),  # valid: no error expected
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">IIIIII", 0, 0, 0, 0, 0, 0)), "without argv"),
        # The user field (protocol 4): missing, too long, or with a NUL.
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">IIIII", 0, 0, 0, 1, 4) + b"true" + b"\0" * 4), "too short"),
        (
            p.frame(
                p.FrameType.EXEC,
                1,
                struct.pack(">IIIII", 0, 0, 0, 1, 4) + b"true" + struct.pack(">II", 0, 256) + b"u" * 256,
            ),
            "user too long",
        ),
        (
            p.frame(
                p.FrameType.EXEC, 1, struct.pack(">IIIII", 0, 0, 0, 1, 4) + b"true" + struct.pack(">II", 0, 3) + b"a\0b"
            ),
            "NUL",
        ),
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">III", 0, 0, 3) + b"a\0b" + b"\0" * 8), "NUL"),
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">III", 0, 0, 0) + b"\xff\xff\xff\xff"), "over the limit"),
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">IIIII", 8, 0, 0, 1, 4) + b"true" + b"\0" * 4), "exec flag"),
        (p.encode_hello_ack(), "after the handshake"),
        (p.encode_exec(0, ["true"]), "id 0"),
        (p.encode_u32(p.FrameType.KILL, 1, 0), "invalid signal"),
        (p.frame(p.FrameType.WINSIZE, 1, b"\0"), "WINSIZE payload"),
        (p.frame(p.FrameType.EXEC, 1, struct.pack(">IIIII", 2, 0, 0, 1, 2) + b"sh" + b"\0" * 4), "PTY without"),
        (p.frame(p.FrameType.EXEC, 1, p.encode_exec(1, ["sh"], stdin_pipe=True, pty=(24, 80))[12:-4]), "too short"),
        (p.encode_u32(p.FrameType.CREDIT, 1, 7) + b"z", None),  # unknown id: ignored... then trailing garbage
    ],
)
def test_agent_answers_malformed_frames_with_eproto_and_reconnects(
    fresh_agent: HostAgent, data: bytes, why: str | None
) -> None:
    sock = handshake_raw(fresh_agent)
    sock.sendall(data)
    if why is None:
        sock.shutdown(socket.SHUT_WR)
        frames = drain(sock)
        assert all(f.type is not p.FrameType.ERROR or f.id != 0 for f in frames)
    else:
        frames = drain(sock)
        errors = [p.parse_error(f.payload) for f in frames if f.type is p.FrameType.ERROR and f.id == 0]
        assert len(errors) == 1, frames
        assert errors[0].code == errno.EPROTO
        assert why in errors[0].message
    sock.close()
    # The agent survived and serves the next connection.
    assert fresh_agent.alive()
    with fresh_agent.client() as client:
        assert client.run(["echo", "ok"]).stdout == b"ok\n"


def test_agent_refuses_commands_before_the_handshake(fresh_agent: HostAgent) -> None:
    sock = fresh_agent.raw()
    sock.sendall(p.encode_exec(1, ["touch", "/tmp/should-not-exist-microvm"]))
    frames = drain(sock)
    sock.close()
    assert frames[0].type is p.FrameType.HELLO
    assert "before the handshake" in p.parse_error(frames[-1].payload).message
    assert not Path("/tmp/should-not-exist-microvm").exists()


def test_agent_reconnects_after_the_host_drops_it(fresh_agent: HostAgent) -> None:
    with fresh_agent.client() as client:
        proc = client.start(["sleep", "30"])
        assert not proc.done
    # The running command was killed with the connection; a new one works.
    with fresh_agent.client() as client:
        assert client.probe() < 5


_SAFE_EXEC = p.encode_exec(1, ["true"])


def _frames_are_safe(data: bytes) -> bool:
    """False if the bytes hold a frame header for EXEC or PUT (never run random argv or write
    random paths) or POWEROFF (on which the agent exits by design)."""
    pos = 0
    while pos + p.HEADER_SIZE <= len(data):
        length, ftype, _flags, _fid = p.HEADER.unpack_from(data, pos)
        if ftype in (p.FrameType.EXEC, p.FrameType.PUT, p.FrameType.POWEROFF):
            return False
        pos += p.HEADER_SIZE + length
    return True


@pytest.fixture(scope="module")
def fuzz_agent(agent_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    with host_agent(agent_binary, tmp_path_factory.mktemp("fuzz")) as agent:
        yield agent


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.tuples(
                st.integers(0, 2**32 - 1),
                st.integers(0, 20),
                st.integers(0, 3),
                st.integers(0, 3),
                st.binary(max_size=64),
            ),
            max_size=6,
        ).map(lambda fs: b"".join(p.HEADER.pack(min(len(b), n), t, f, i) + b for n, t, f, i, b in fs)),
    )
)
def test_agent_survives_arbitrary_bytes(fuzz_agent: HostAgent, data: bytes) -> None:
    assume(_frames_are_safe(data))
    sock = handshake_raw(fuzz_agent)
    sock.sendall(_SAFE_EXEC + data)
    sock.shutdown(socket.SHUT_WR)
    try:
        frames = drain(sock)  # must be well-formed (FrameDecoder raises otherwise) and end
    except ProtocolError as exc:
        pytest.fail(f"the agent sent a malformed frame: {exc}")
    finally:
        sock.close()
    assert all(f.type in p.FROM_AGENT for f in frames)
    assert fuzz_agent.alive(), f"the agent exited with status {fuzz_agent.proc.returncode} on {data!r}"
    assert rss_kib(fuzz_agent.pid) < 16 * 1024  # no allocation driven by the lengths it was sent


def test_agent_error_after_queued_output_keeps_the_stream_intact(fresh_agent: HostAgent) -> None:
    """Output queued before a malformed frame is delivered whole, then the ERROR."""
    sock = handshake_raw(fresh_agent)
    # Eight jobs' credit windows (2 MiB) of output the host does not read: more than the
    # socket buffer holds, so the agent's queue ends in a partly sent frame.
    for job in range(1, 9):
        sock.sendall(p.encode_exec(job, ["head", "-c", str(4 << 20), "/dev/zero"]))
    time.sleep(1.0)
    sock.sendall(p.HEADER.pack(0, 99, 0, 1))  # malformed
    frames = drain(sock)  # FrameDecoder raises if a frame was cut
    sock.close()
    assert frames[-1].type is p.FrameType.ERROR and frames[-1].id == 0
    assert "unknown frame type" in p.parse_error(frames[-1].payload).message
    assert all(f.type is p.FrameType.STDOUT for f in frames[:-1])
    assert fresh_agent.alive()
