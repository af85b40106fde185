"""CLONE (docs/protocol.md) on both ends without a VM: the host's encoder, and the real
agent binary run on the host (not PID 1) over a Unix socket, which must refuse a
well-formed CLONE with EPERM (it must never set the host's clock) and answer malformed
ones with EPROTO, then reconnect as after any connection error.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_microvm import protocol as p
from tests.agent_harness import HostAgent, drain, handshake_raw

# ---- the host's encoder ------------------------------------------------------------------


def test_encode_clone_lays_out_the_fields_as_the_spec_says() -> None:
    seconds = (1 << 32) + 5  # past 2106: the high word is used
    entropy = bytes(range(16))
    data = p.encode_clone(seconds * 1_000_000_000 + 123, "tok", entropy)
    assert p.HEADER.unpack_from(data) == (len(data) - p.HEADER_SIZE, p.FrameType.CLONE, 0, 0)
    payload = data[p.HEADER_SIZE :]
    assert payload == struct.pack(">IIII", 1, 5, 123, 3) + b"tok" + struct.pack(">I", 16) + entropy


@pytest.mark.parametrize("size", [16, 512])
def test_encode_clone_takes_entropy_at_the_limits(size: int) -> None:
    entropy = os.urandom(size)
    data = p.encode_clone(time.time_ns(), "t" * p.MAX_TOKEN, entropy)
    assert data.endswith(struct.pack(">I", p.MAX_TOKEN) + b"t" * p.MAX_TOKEN + struct.pack(">I", size) + entropy)


@pytest.mark.parametrize(
    ("token", "entropy", "match"),
    [
        ("tok", b"e" * 15, "entropy must be 16..512 bytes, not 15"),
        ("tok", b"e" * 513, "entropy must be 16..512 bytes, not 513"),
        ("tok", b"", "entropy must be 16..512 bytes, not 0"),
        ("", b"e" * 16, "token must be 1..255 bytes"),
        ("t" * 256, b"e" * 16, "token must be 1..255 bytes"),
        ("é" * 128, b"e" * 16, "token must be 1..255 bytes"),  # 256 bytes in UTF-8
        ("a\0b", b"e" * 16, "NUL"),
    ],
)
def test_encode_clone_refuses_what_the_agent_would_call_malformed(token: str, entropy: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        p.encode_clone(time.time_ns(), token, entropy)


# ---- the real agent on the host -----------------------------------------------------------


def connection_errors(frames: list[p.Frame]) -> list[p.ErrorInfo]:
    return [p.parse_error(f.payload) for f in frames if f.type is p.FrameType.ERROR and f.id == 0]


def assert_serves_again(agent: HostAgent) -> None:
    """The agent survived, reconnected, and still says its own token (not a CLONE's)."""
    assert agent.alive()
    with agent.client() as client:  # the handshake checks the token
        assert client.run(["echo", "ok"]).stdout == b"ok\n"


def _clone(payload: bytes, fid: int = 0) -> bytes:
    return p.frame(p.FrameType.CLONE, fid, payload)


def clone_payload(
    *,
    seconds: int | None = None,
    nanoseconds: int = 0,
    token: bytes = b"clone-token",
    entropy: bytes = b"\x5a" * 32,
    entropy_length: int | None = None,
    trailing: bytes = b"",
) -> bytes:
    """A CLONE payload built field by field (encode_clone refuses the bad ones)."""
    if seconds is None:
        seconds = int(time.time())  # now: harmless even if an agent wrongly set the clock
    n = len(entropy) if entropy_length is None else entropy_length
    return (
        struct.pack(">III", seconds >> 32, seconds & 0xFFFFFFFF, nanoseconds)
        + struct.pack(">I", len(token))
        + token
        + struct.pack(">I", n)
        + entropy
        + trailing
    )


# Frames are made when a test runs, not when it is collected: the clock they carry is
# "now", so even an agent that wrongly set the host's clock would barely move it.
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: p.encode_clone(time.time_ns(), "clone-token", os.urandom(64)), id="encoded"),
        pytest.param(lambda: _clone(clone_payload(entropy=b"e" * 16)), id="16-bytes-entropy"),
        pytest.param(lambda: _clone(clone_payload(entropy=b"e" * 512)), id="512-bytes-entropy"),
        pytest.param(lambda: _clone(clone_payload(token=b"t" * 255)), id="255-bytes-token"),
        pytest.param(lambda: _clone(clone_payload(nanoseconds=999_999_999)), id="last-nanosecond"),
    ],
)
def test_host_agent_refuses_a_well_formed_clone_with_eperm_and_reconnects(
    fresh_agent: HostAgent, tmp_path: Path, make: Callable[[], bytes]
) -> None:
    marker = tmp_path / "ran-after-clone"
    sock = handshake_raw(fresh_agent)
    # A command right behind it must not run: the agent closes the connection first.
    sock.sendall(make() + p.encode_exec(1, ["touch", str(marker)]))
    frames = drain(sock)  # returns only once the agent closed the connection
    sock.close()
    assert [(f.type, f.id) for f in frames] == [(p.FrameType.ERROR, 0)], frames
    (error,) = connection_errors(frames)
    assert error.code == errno.EPERM
    assert "CLONE: setting the clock failed" in error.message
    assert not marker.exists()
    assert_serves_again(fresh_agent)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(lambda: _clone(clone_payload(entropy=b"e" * 8)), "entropy not between 16 and 512", id="entropy-8"),
        pytest.param(
            lambda: _clone(clone_payload(entropy=b"e" * 15)), "entropy not between 16 and 512", id="entropy-15"
        ),
        pytest.param(
            lambda: _clone(clone_payload(entropy=b"e" * 513)), "entropy not between 16 and 512", id="entropy-513"
        ),
        pytest.param(
            lambda: _clone(clone_payload(entropy=b"e" * 600)), "entropy not between 16 and 512", id="entropy-600"
        ),
        pytest.param(
            lambda: _clone(clone_payload(entropy=b"e" * 10, entropy_length=64)), "runs past the end", id="entropy-cut"
        ),
        pytest.param(lambda: _clone(clone_payload(token=b"")), "bad time or token", id="empty-token"),
        pytest.param(lambda: _clone(clone_payload(token=b"t" * 256)), "bad time or token", id="token-256"),
        pytest.param(lambda: _clone(clone_payload(token=b"a\0b")), "NUL byte", id="token-nul"),
        pytest.param(
            lambda: _clone(clone_payload(nanoseconds=1_000_000_000)), "bad time or token", id="nanoseconds-1e9"
        ),
        pytest.param(lambda: _clone(clone_payload(trailing=b"x")), "trailing bytes", id="trailing"),
        pytest.param(lambda: _clone(clone_payload()[:10]), "too short", id="truncated"),
        pytest.param(lambda: _clone(b""), "too short", id="empty"),
        pytest.param(lambda: _clone(clone_payload(), fid=7), "connection frame with a job id", id="job-id"),
    ],
)
def test_host_agent_answers_a_malformed_clone_with_eproto_and_reconnects(
    fresh_agent: HostAgent, make: Callable[[], bytes], why: str
) -> None:
    sock = handshake_raw(fresh_agent)
    sock.sendall(make())
    frames = drain(sock)
    sock.close()
    errors = connection_errors(frames)
    assert len(errors) == 1 and len(frames) == 1, frames
    assert errors[0].code == errno.EPROTO
    assert errors[0].message.startswith("malformed frame: ")
    assert why in errors[0].message
    assert_serves_again(fresh_agent)


def test_host_agent_refuses_clone_before_the_handshake(fresh_agent: HostAgent) -> None:
    sock = fresh_agent.raw()
    sock.sendall(p.encode_clone(time.time_ns(), "clone-token", os.urandom(32)))
    frames = drain(sock)
    sock.close()
    assert frames[0].type is p.FrameType.HELLO
    (error,) = connection_errors(frames)
    assert error.code == errno.EPROTO and "before the handshake" in error.message
    assert_serves_again(fresh_agent)
