"""Command line of the userspace vsock backend.

    python -m pytest_microvm.channel.vhost_user --socket /tmp/vm/vhost.sock \\
        --uds /tmp/vm/vsock --guest-cid 3

QEMU connects to ``--socket`` (``-chardev socket,path=…`` + ``-device vhost-user-vsock-pci``);
guest connections to CID 2 port P reach ``<uds>_P``; host programs connect to ``<uds>``
and write ``CONNECT <port>\\n``. Serves one QEMU and exits when it disconnects.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_microvm.channel.vhost_user.backend import run


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_microvm.channel.vhost_user", description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="vhost-user socket path to listen on for QEMU")
    where.add_argument("--socket-fd", type=int, help="an already listening vhost-user socket (inherited fd)")
    ap.add_argument("--uds", required=True, help="host side: <uds> for CONNECT, <uds>_<port> for guest connections")
    ap.add_argument("--guest-cid", type=int, required=True, help="the guest's CID (3 or more)")
    ap.add_argument("--accept-timeout", type=float, default=None, help="give up if QEMU has not connected by then")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: every vhost-user message")
    args = ap.parse_args(argv)
    if not 3 <= args.guest_cid < 0xFFFFFFFF:
        ap.error(f"--guest-cid {args.guest_cid}: CIDs 0, 1, 2 and 0xffffffff are reserved")
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="vhost-user-vsock[%(process)d] %(levelname)s %(message)s",
    )
    # SIGTERM is how the harness stops us: unwind through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.socket is None:
        return run(socket.socket(fileno=args.socket_fd), args.uds, args.guest_cid, args.accept_timeout)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        control.bind(args.socket)
        control.listen(1)
        return run(control, args.uds, args.guest_cid, args.accept_timeout)
    finally:
        control.close()
        Path(args.socket).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
