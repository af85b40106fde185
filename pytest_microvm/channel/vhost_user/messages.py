"""The vhost-user wire format as QEMU 7.2 speaks it to a vsock backend (pure, no I/O).

Header ``<III``: request, flags, payload size; file descriptors ride along with the
header as SCM_RIGHTS. Replies must carry flags exactly ``VERSION | REPLY`` (0x5) or QEMU
rejects them. tests/data/qemu-7.2-vhost-user-traces holds recorded message sequences.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096  # the largest message a vsock device sends is a memory table (8 + 32n)
MAX_FDS = 8
MAX_REGIONS = 8

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY

# Device features we offer. Only what we implement: QEMU passes a feature to the guest
# only if the backend offers it, so leaving out EVENT_IDX, INDIRECT_DESC and SEQPACKET
# keeps the guest on the plain split-ring path.
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
FEATURES = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES

PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9  # mandatory for vhost-user-vsock: the CID comes from GET_CONFIG
PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

NUM_QUEUES = 2  # rx and tx; QEMU keeps the event queue to itself
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


class VhostUserError(Exception):
    """QEMU sent something this backend cannot follow; the session ends."""


@dataclass(frozen=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def u64(self) -> int:
        if len(self.payload) != 8:
            raise VhostUserError(f"request {self.request}: expected a u64 payload, got {len(self.payload)} bytes")
        return int(struct.unpack("<Q", self.payload)[0])

    def vring_state(self) -> tuple[int, int]:
        if len(self.payload) != 8:
            raise VhostUserError(f"request {self.request}: expected a vring state, got {len(self.payload)} bytes")
        index, num = struct.unpack("<II", self.payload)
        return int(index), int(num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int  # QEMU virtual addresses (translated through the memory table's uva)
    used: int
    avail: int
    log: int


def parse_vring_addr(payload: bytes) -> VringAddr:
    if len(payload) != 40:
        raise VhostUserError(f"SET_VRING_ADDR: expected 40 bytes, got {len(payload)}")
    return VringAddr(*struct.unpack("<IIQQQQ", payload))


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


def parse_mem_table(payload: bytes) -> list[MemRegion]:
    if len(payload) < 8:
        raise VhostUserError("SET_MEM_TABLE: payload too short")
    (n, _pad) = struct.unpack_from("<II", payload)
    if n == 0 or n > MAX_REGIONS or len(payload) != 8 + 32 * n:
        raise VhostUserError(f"SET_MEM_TABLE: {n} regions in {len(payload)} bytes")
    return [MemRegion(*struct.unpack_from("<QQQQ", payload, 8 + 32 * i)) for i in range(n)]


def reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


def reply_u64(request: int, value: int) -> bytes:
    return reply(request, struct.pack("<Q", value))


def encode(request: int, payload: bytes = b"", flags: int = FLAG_VERSION) -> bytes:
    """A request as QEMU would send it (for tests that play QEMU)."""
    return HEADER.pack(request, flags, len(payload)) + payload
