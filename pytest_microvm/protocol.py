"""The host side of docs/protocol.md: frame layout, limits, encoders and a strict decoder.

Pure data, no I/O: the client feeds received bytes into :class:`FrameDecoder` and sends
what the ``encode_*`` functions return. Everything here mirrors the spec; when the spec
changes, this module and ``guest-image/agent/agent.c`` change with it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_microvm.errors import ProtocolError

PROTOCOL_VERSION = 4
HEADER = struct.Struct(">IHHI")  # length, type, flags, id
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
MAX_USER = 255  # EXEC's user field, bytes
MAX_CHUNK = 64 * 1024  # largest STDOUT/STDERR chunk the agent sends
MAX_ARGS = 4096
MAX_JOBS = 64
OUTPUT_WINDOW = 256 * 1024
STDIN_WINDOW = 256 * 1024
CLONE_ENTROPY = (16, 512)  # bytes of host randomness a CLONE frame may carry
MAX_TOKEN = 255

EXEC_STDIN_PIPE = 0x1
EXEC_PTY = 0x2
EXIT_TIMED_OUT = 0x1


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    EXEC = 3
    STDIN = 4
    STDOUT = 5
    STDERR = 6
    EXIT = 7
    KILL = 8
    CREDIT = 9
    PUT = 10
    GET = 11
    ERROR = 12
    POWEROFF = 13
    WINSIZE = 14
    CLONE = 15


FROM_AGENT = frozenset(
    {FrameType.HELLO, FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.CREDIT, FrameType.ERROR}
)
FROM_HOST = frozenset(
    {
        FrameType.HELLO_ACK,
        FrameType.EXEC,
        FrameType.STDIN,
        FrameType.KILL,
        FrameType.CREDIT,
        FrameType.PUT,
        FrameType.GET,
        FrameType.ERROR,
        FrameType.POWEROFF,
        FrameType.WINSIZE,
        FrameType.CLONE,
    }
)
JOB_FRAMES = frozenset(
    {
        FrameType.EXEC,
        FrameType.STDIN,
        FrameType.STDOUT,
        FrameType.STDERR,
        FrameType.EXIT,
        FrameType.KILL,
        FrameType.CREDIT,
        FrameType.PUT,
        FrameType.GET,
        FrameType.WINSIZE,
    }
)


@dataclass(frozen=True)
class Frame:
    """One frame as received: its type, id and raw payload."""

    type: FrameType
    id: int
    payload: bytes


@dataclass(frozen=True)
class Hello:
    version: int
    agent_version: str
    token: str


@dataclass(frozen=True)
class Exit:
    exit_code: int
    signal: int
    timed_out: bool


@dataclass(frozen=True)
class ErrorInfo:
    code: int
    message: str


# ---- encoding --------------------------------------------------------------------


def frame(ftype: FrameType, fid: int, payload: bytes = b"") -> bytes:
    """Header plus payload. Refuses what the peer would call malformed."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    return HEADER.pack(len(payload), ftype, 0, fid) + payload


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def _c_str(value: str | bytes, what: str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if b"\0" in data:
        raise ValueError(f"{what} must not contain a NUL byte: {value!r}")
    return _str(data)


def _strv(values: Sequence[str | bytes], what: str) -> bytes:
    if len(values) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} {what} entries are allowed, got {len(values)}")
    return struct.pack(">I", len(values)) + b"".join(_c_str(v, what) for v in values)


def encode_hello(agent_version: str, token: str) -> bytes:
    return frame(FrameType.HELLO, 0, struct.pack(">HH", PROTOCOL_VERSION, 0) + _str(agent_version) + _str(token))


def encode_hello_ack() -> bytes:
    return frame(FrameType.HELLO_ACK, 0, struct.pack(">HH", PROTOCOL_VERSION, 0))


def encode_exec(
    fid: int,
    argv: Sequence[str | bytes],
    *,
    env: Iterable[str | bytes] = (),
    cwd: str = "",
    stdin_pipe: bool = False,
    pty: tuple[int, int] | None = None,
    timeout_ms: int = 0,
    user: str = "",
) -> bytes:
    """EXEC; ``pty=(rows, cols)``: on a new terminal of that size, set before the command starts;
    ``user``: ``NAME``, ``UID``, ``NAME:GROUP`` or ``UID:GID`` (empty: the agent's own)."""
    if not argv:
        raise ValueError("argv must not be empty")
    if pty is not None and not stdin_pipe:
        raise ValueError("a PTY needs stdin_pipe (the terminal's input)")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise ValueError(f"timeout_ms out of range: {timeout_ms}")
    flags = (EXEC_STDIN_PIPE if stdin_pipe else 0) | (EXEC_PTY if pty is not None else 0)
    check_user(user)
    payload = (
        struct.pack(">II", flags, timeout_ms)
        + _c_str(cwd, "cwd")
        + _strv(list(argv), "argv")
        + _strv(list(env), "env")
        + _c_str(user, "user")
    )
    if pty is not None:
        payload += _winsize(*pty)
    return frame(FrameType.EXEC, fid, payload)


def check_user(user: str) -> None:
    """ValueError unless ``user`` is empty or ``NAME``/``UID`` with an optional ``:GROUP``."""
    if not user:
        return
    name, sep, group = user.partition(":")
    if not name or (sep and not group) or ":" in group or "\0" in user or len(user.encode()) > MAX_USER:
        raise ValueError(f"user {user!r}: write NAME, UID, NAME:GROUP or UID:GID (at most {MAX_USER} bytes, no NUL)")


def encode_clone(realtime_ns: int, token: str, entropy: bytes) -> bytes:
    """CLONE: the clone's wall clock (ns since the epoch), its own token and fresh entropy."""
    low, high = CLONE_ENTROPY
    if not low <= len(entropy) <= high:
        raise ValueError(f"CLONE entropy must be {low}..{high} bytes, not {len(entropy)}")
    if not 1 <= len(token.encode()) <= MAX_TOKEN:
        raise ValueError(f"CLONE token must be 1..{MAX_TOKEN} bytes")
    if not 0 <= realtime_ns < 1 << 64:
        raise ValueError(f"CLONE time out of range: {realtime_ns} ns")
    seconds, nanoseconds = divmod(realtime_ns, 1_000_000_000)
    payload = struct.pack(">III", seconds >> 32, seconds & 0xFFFFFFFF, nanoseconds)
    return frame(FrameType.CLONE, 0, payload + _c_str(token, "token") + _str(entropy))


def encode_u32(ftype: FrameType, fid: int, value: int) -> bytes:
    return frame(ftype, fid, struct.pack(">I", value))


def encode_exit(fid: int, exit_code: int, sig: int = 0, timed_out: bool = False) -> bytes:
    return frame(FrameType.EXIT, fid, struct.pack(">iII", exit_code, sig, EXIT_TIMED_OUT if timed_out else 0))


def encode_error(fid: int, code: int, message: str) -> bytes:
    return frame(FrameType.ERROR, fid, struct.pack(">I", code) + _str(message))


def _winsize(rows: int, cols: int) -> bytes:
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError(f"window size {rows}x{cols} out of range")
    return struct.pack(">HH", rows, cols)


def encode_winsize(fid: int, rows: int, cols: int) -> bytes:
    return frame(FrameType.WINSIZE, fid, _winsize(rows, cols))


def encode_put(fid: int, path: str, mode: int) -> bytes:
    return frame(FrameType.PUT, fid, struct.pack(">I", mode & 0o7777) + _c_str(path, "path"))


def encode_get(fid: int, path: str) -> bytes:
    return frame(FrameType.GET, fid, _c_str(path, "path"))


# ---- decoding --------------------------------------------------------------------


class _Cursor:
    """Reads typed fields from a payload; any overrun is a ProtocolError."""

    def __init__(self, ftype: FrameType, payload: bytes) -> None:
        self.ftype = ftype
        self.data = memoryview(payload)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"{self.ftype.name} payload too short")
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> tuple[int, ...]:
        st = struct.Struct(fmt)
        return st.unpack(self._take(st.size))

    def string(self) -> str:
        (n,) = self.unpack(">I")
        if n > len(self.data) - self.pos:
            raise ProtocolError(f"{self.ftype.name}: string runs past the end of the payload")
        return bytes(self._take(n)).decode(errors="replace")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.ftype.name}: {len(self.data) - self.pos} trailing bytes in payload")


def parse_hello(payload: bytes) -> Hello:
    c = _Cursor(FrameType.HELLO, payload)
    version, reserved = c.unpack(">HH")
    agent_version, token = c.string(), c.string()
    c.end()
    if reserved:
        raise ProtocolError("HELLO: reserved field is not 0")
    return Hello(version, agent_version, token)


def parse_exit(payload: bytes) -> Exit:
    c = _Cursor(FrameType.EXIT, payload)
    code, sig, flags = c.unpack(">iII")
    c.end()
    if flags & ~EXIT_TIMED_OUT:
        raise ProtocolError(f"EXIT: unknown flags {flags:#x}")
    if sig > 64:
        raise ProtocolError(f"EXIT: invalid signal number {sig}")
    return Exit(code, sig, bool(flags & EXIT_TIMED_OUT))


def parse_error(payload: bytes) -> ErrorInfo:
    c = _Cursor(FrameType.ERROR, payload)
    (code,) = c.unpack(">I")
    message = c.string()
    c.end()
    return ErrorInfo(code, message)


def parse_u32(ftype: FrameType, payload: bytes) -> int:
    c = _Cursor(ftype, payload)
    (value,) = c.unpack(">I")
    c.end()
    return value


class FrameDecoder:
    """Turns a byte stream into frames, judging each header before its payload arrives.

    ``allowed`` is the set of types the peer may send (``FROM_AGENT`` on the host). The
    buffer never holds more than one maximal frame plus what one ``feed`` brought, so an
    oversized length is an error, never an allocation.
    """

    def __init__(self, allowed: frozenset[FrameType] = FROM_AGENT) -> None:
        self._allowed = allowed
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER_SIZE:
            length, raw_type, flags, fid = HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
            if flags:
                raise ProtocolError(f"frame header flags are {flags:#x}, must be 0")
            try:
                ftype = FrameType(raw_type)
            except ValueError:
                raise ProtocolError(f"unknown frame type {raw_type}") from None
            if ftype not in self._allowed:
                raise ProtocolError(f"{ftype.name} frame sent in the wrong direction")
            if (ftype in JOB_FRAMES) != (fid != 0) and ftype is not FrameType.ERROR:
                raise ProtocolError(f"{ftype.name} frame with id {fid}")
            if len(buf) - pos < HEADER_SIZE + length:
                break
            start = pos + HEADER_SIZE
            frames.append(Frame(ftype, fid, bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return frames
