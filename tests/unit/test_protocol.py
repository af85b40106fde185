"""The frame codec in isolation: layout, limits, and strictness against arbitrary bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_microvm import ProtocolError
from pytest_microvm import protocol as p


def test_header_layout_is_big_endian_length_type_flags_id() -> None:
    data = p.frame(p.FrameType.STDOUT, 0x01020304, b"abc")
    assert data == b"\x00\x00\x00\x03" + b"\x00\x05" + b"\x00\x00" + b"\x01\x02\x03\x04" + b"abc"


def test_round_trip_of_agent_frames() -> None:
    stream = (
        p.encode_hello("1.2.3", "tok")
        + p.frame(p.FrameType.STDOUT, 7, b"out")
        + p.encode_exit(7, -1, 9, timed_out=True)
        + p.encode_error(8, 2, "no such file")
    )
    dec = p.FrameDecoder()
    # Byte by byte: frames come out only when complete.
    frames = [f for i in range(len(stream)) for f in dec.feed(stream[i : i + 1])]
    assert [f.type for f in frames] == [p.FrameType.HELLO, p.FrameType.STDOUT, p.FrameType.EXIT, p.FrameType.ERROR]
    assert p.parse_hello(frames[0].payload) == p.Hello(p.PROTOCOL_VERSION, "1.2.3", "tok")
    assert frames[1].payload == b"out"
    assert p.parse_exit(frames[2].payload) == p.Exit(-1, 9, True)
    assert p.parse_error(frames[3].payload) == p.ErrorInfo(2, "no such file")


def test_exec_encoding_matches_the_spec() -> None:
    data = p.encode_exec(5, ["ls", "-l"], env=["A=1"], cwd="/tmp", stdin_pipe=True, timeout_ms=1500)
    length, ftype, flags, fid = p.HEADER.unpack_from(data)
    assert (ftype, flags, fid, length) == (p.FrameType.EXEC, 0, 5, len(data) - 12)
    payload = data[12:]
    assert struct.unpack_from(">II", payload) == (p.EXEC_STDIN_PIPE, 1500)
    assert payload[8:] == (
        b"\x00\x00\x00\x04/tmp" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x02ls" + b"\x00\x00\x00\x02-l"
        b"\x00\x00\x00\x01" + b"\x00\x00\x00\x03A=1" + b"\x00\x00\x00\x00"  # user: empty, the agent's own
    )
    with_user = p.encode_exec(5, ["id"], user="nobody:nogroup")[12:]
    assert with_user.endswith(b"\x00\x00\x00\x00" + b"\x00\x00\x00\x0enobody:nogroup")  # after the (empty) env


@pytest.mark.parametrize("user", [":", "a:", ":g", "a:b:c", "a\0b", "u" * 256])
def test_a_malformed_user_is_refused_before_sending(user: str) -> None:
    with pytest.raises(ValueError, match="write NAME, UID, NAME:GROUP or UID:GID"):
        p.encode_exec(1, ["id"], user=user)


def test_exec_on_a_terminal_carries_its_size() -> None:
    data = p.encode_exec(5, ["sh"], stdin_pipe=True, pty=(33, 101))
    payload = data[12:]
    assert struct.unpack_from(">I", payload) == (p.EXEC_STDIN_PIPE | p.EXEC_PTY,)
    assert payload.endswith(b"\x00\x00\x00\x00" * 2 + struct.pack(">HH", 33, 101))  # no env, no user, rows, cols
    assert len(payload) == len(p.encode_exec(5, ["sh"], stdin_pipe=True)[12:]) + 4
    with pytest.raises(ValueError, match="out of range"):
        p.encode_exec(5, ["sh"], stdin_pipe=True, pty=(70000, 80))


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    dec = p.FrameDecoder()
    header = p.HEADER.pack(p.MAX_PAYLOAD + 1, p.FrameType.STDOUT, 0, 1)
    with pytest.raises(ProtocolError, match="MAX_PAYLOAD"):
        dec.feed(header)  # no payload needed to judge it


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (p.HEADER.pack(0, 99, 0, 1), "unknown frame type"),
        (p.HEADER.pack(0, p.FrameType.STDOUT, 1, 1), "flags"),
        (p.HEADER.pack(0, p.FrameType.EXEC, 0, 1), "wrong direction"),
        (p.HEADER.pack(4, p.FrameType.EXIT, 0, 0), "id 0"),
        (p.HEADER.pack(0, p.FrameType.HELLO, 0, 3), "id 3"),
    ],
)
def test_malformed_headers(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.FrameDecoder().feed(header)


@pytest.mark.parametrize(
    ("parse", "payload", "message"),
    [
        (p.parse_exit, b"\x00" * 11, "too short"),
        (p.parse_exit, b"\x00" * 13, "trailing"),
        (p.parse_exit, struct.pack(">iII", 0, 0, 2), "flags"),
        (p.parse_exit, struct.pack(">iII", -1, 99, 0), "signal"),
        (p.parse_error, struct.pack(">II", 1, 100) + b"x", "past the end"),
        (p.parse_hello, struct.pack(">HH", 1, 0), "too short"),
    ],
)
def test_malformed_payloads(parse: object, payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse(payload)  # type: ignore[operator]


def test_encoders_refuse_what_the_agent_would_call_malformed() -> None:
    with pytest.raises(ValueError):
        p.encode_exec(1, [])
    with pytest.raises(ValueError, match="NUL"):
        p.encode_put(1, "a\0b", 0o644)
    with pytest.raises(ValueError, match="MAX_PAYLOAD"):
        p.frame(p.FrameType.STDIN, 1, b"x" * (p.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="4096"):
        p.encode_exec(1, ["x"] * (p.MAX_ARGS + 1))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_decoder_only_ever_raises_protocol_error_and_stays_bounded(chunks: list[bytes]) -> None:
    dec = p.FrameDecoder()
    try:
        for chunk in chunks:
            for f in dec.feed(chunk):
                assert f.type in p.FROM_AGENT
                assert len(f.payload) <= p.MAX_PAYLOAD
            # Never more buffered than one header's worth of a frame it has not judged,
            # or one maximal frame it has.
            assert len(dec._buf) <= p.HEADER_SIZE + p.MAX_PAYLOAD
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
def test_payload_parsers_only_raise_protocol_error(payload: bytes) -> None:
    for parse in (p.parse_exit, p.parse_error, p.parse_hello, lambda b: p.parse_u32(p.FrameType.CREDIT, b)):
        with contextlib.suppress(ProtocolError):
            parse(payload)
