"""Minimal synthetic ELF files for builder unit tests (no real kernel needed)."""

from __future__ import annotations

import struct


def elf64(*, notes: bytes = b"", sections: dict[str, bytes] | None = None) -> bytes:
    """An ELF64 with one PT_NOTE segment holding ``notes`` and the given named sections."""
    sections = sections or {}
    ehdr_size, phent, shent = 64, 56, 64
    body = bytearray()
    note_off = ehdr_size + phent
    body += notes
    names = b"\0.shstrtab\0" + b"".join(n.encode() + b"\0" for n in sections)
    sec_data: list[tuple[int, int, int]] = []  # name offset, file offset, size
    for name, data in sections.items():
        sec_data.append((names.index(name.encode() + b"\0"), note_off + len(body), len(data)))
        body += data
    strtab_off = note_off + len(body)
    body += names
    shoff = note_off + len(body)
    shnum = 2 + len(sections)
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, ehdr_size, shoff, 0, ehdr_size, phent, 1, shent, shnum, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    shdrs = b"\0" * shent
    shdrs += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, strtab_off, len(names), 0, 0, 1, 0)
    for name_off, off, size in sec_data:
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, off, size, 0, 0, 1, 0)
    return header + phdr + bytes(body) + shdrs


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def bzimage(payload: bytes, setup_sects: int = 1) -> bytes:
    """A bzImage header (boot protocol 2.15) whose compressed payload is ``payload``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0, len(payload))
    return bytes(setup) + payload
