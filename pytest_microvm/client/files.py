"""File transfer between host and guest, run over a :class:`~.connection.Connection`.

Owns the PUT and GET jobs: content goes to the guest as STDIN frames within the
connection's credit, and comes back as output frames handed to a sink as they arrive, so
neither direction holds a whole file in memory unless the caller asked for bytes. The
host opens every host-side path itself; the guest only ever names its own.
:class:`~pytest_microvm.client.AgentClient` is the public face of these functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from pytest_microvm import protocol as p
from pytest_microvm.client.connection import Connection, Sink


def write_file(conn: Connection, remote: str, data: bytes | BinaryIO, *, mode: int, timeout: float | None) -> None:
    """PUT ``data`` (bytes, or a binary file read a window at a time) to the guest path ``remote``."""
    job = conn.open_job(["PUT", remote], None, lambda fid: p.encode_put(fid, remote, mode))
    if isinstance(data, (bytes, bytearray, memoryview)):
        conn.send_stdin(job, data, timeout)
    else:
        while chunk := data.read(p.STDIN_WINDOW):
            conn.send_stdin(job, chunk, timeout)
    conn.close_stdin(job)
    conn.wait(job, timeout)
    job.raise_if_failed()


def put_file(conn: Connection, local: str | os.PathLike[str], remote: str, *, mode: int | None) -> None:
    """Copy the host file ``local`` to ``remote``, with its own permission bits if ``mode`` is None."""
    path = Path(local)
    with path.open("rb") as fh:
        write_file(conn, remote, fh, mode=path.stat().st_mode & 0o7777 if mode is None else mode, timeout=None)


def _get(conn: Connection, remote: str, sink: Sink, timeout: float | None) -> None:
    job = conn.open_job(["GET", remote], sink, lambda fid: p.encode_get(fid, remote))
    conn.wait(job, timeout)
    job.raise_if_failed()


def read_file(conn: Connection, remote: str, *, timeout: float | None) -> bytes:
    """GET the guest file ``remote`` into memory."""
    buf = bytearray()
    _get(conn, remote, lambda _t, data: buf.extend(data), timeout)
    return bytes(buf)


def get_file(conn: Connection, remote: str, local: str | os.PathLike[str], *, timeout: float | None) -> int:
    """GET the guest file ``remote`` into the host file ``local``; the bytes written."""
    path = Path(local)
    written = 0
    with path.open("wb") as fh:

        def sink(_t: p.FrameType, data: bytes) -> None:
            nonlocal written
            fh.write(data)
            written += len(data)

        try:
            _get(conn, remote, sink, timeout)
        except BaseException:
            # No half-copied file that looks like the real one is left behind.
            fh.close()
            path.unlink(missing_ok=True)
            raise
    return written
