"""connect_agent: the accept-then-handshake step both vsock paths use, with fakes for the guest.

A socketpair stands in for each connection the listener hands out; the real handshake code
reads its HELLO. What the tests assert: strangers and wrong tokens are turned away without
ending the wait, the right agent still gets through after them, and a wait that ends empty
says what it turned away (once per reason, with a count: an agent retries every 10 ms).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pytest_microvm import protocol as p
from pytest_microvm.client import connect_agent, summarize
from pytest_microvm.errors import CommandTimeout

TOKEN = "a" * 32


class FakeListener:
    """Hands out one connection per entry: a HELLO with that token, or a stranger the
    listener itself turned away (a wrong CID), then nothing."""

    def __init__(self, peers: list[str]) -> None:
        self.port = 1024
        self.refused: list[str] = []
        self._peers: Iterator[str] = iter(peers)
        self._keep: list[socket.socket] = []

    def accept(self, timeout: float | None) -> socket.socket:
        for peer in self._peers:
            if peer.startswith("cid:"):
                self.refused.append(f"a connection from CID {peer[4:]}, not this VM's CID 5")
                continue
            ours, guest = socket.socketpair()
            guest.sendall(p.encode_hello("test", peer))
            self._keep.append(guest)
            return ours
        time.sleep(min(timeout or 0.05, 0.05))
        raise CommandTimeout("no connection")

    def close(self) -> None:
        for s in self._keep:
            s.close()


def test_the_right_agent_gets_through_after_strangers_and_wrong_tokens() -> None:
    listener = FakeListener(["cid:7", "b" * 32, "cid:9", TOKEN])
    refused: list[str] = []
    with connect_agent(listener, token=TOKEN, timeout=5, refused=refused) as client:
        assert client.hello.token == TOKEN
    assert refused == [
        "a connection from CID 7, not this VM's CID 5",
        "agent presented a wrong token: not the guest this host booted",
        "a connection from CID 9, not this VM's CID 5",
    ]
    listener.close()


def test_a_wait_that_ends_empty_says_what_it_turned_away() -> None:
    listener = FakeListener(["b" * 32] * 3 + ["cid:7"])
    with pytest.raises(CommandTimeout) as info:
        connect_agent(listener, token=TOKEN, timeout=0.5)
    assert str(info.value) == (
        "no agent connected within 0.5s (turned away: agent presented a wrong token: not the guest "
        "this host booted (x3); a connection from CID 7, not this VM's CID 5)"
    )
    listener.close()


def test_watch_runs_while_waiting_and_may_end_the_wait() -> None:
    class Died(Exception):
        pass

    calls = []

    def watch() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Died

    with pytest.raises(Died):
        connect_agent(FakeListener([]), token=TOKEN, timeout=30, watch=watch)


def test_summarize_keeps_first_seen_order() -> None:
    assert summarize(["x", "y", "x"]) == "x (x2); y"
