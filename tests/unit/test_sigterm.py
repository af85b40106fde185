"""SIGTERM handling of the plugin (pytest_microvm/_sigterm.py), each case in a child process
of its own (signals sent to the test process itself would reach pytest and xdist)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.agent_harness import reaping
from tests.signals import defaults


def _child(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    prelude = (
        "import os, signal, subprocess, sys, time\nfrom pytest_microvm._sigterm import SigtermUnwinds, Terminated\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=defaults(signal.SIGTERM, signal.SIGINT),
    )  # fmt: skip
    with reaping(proc):
        out = proc.communicate(timeout=timeout)[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def test_sigterm_raises_an_interruption_once_and_a_second_one_kills() -> None:
    r = _child(
        """
        SigtermUnwinds().install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated as exc:
            assert isinstance(exc, KeyboardInterrupt)  # pytest unwinds as after Ctrl-C
            print("unwinding:", exc, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # someone insists while the unwind runs
        time.sleep(5)
        print("survived")
        """
    )
    assert "unwinding: SIGTERM" in r.stdout and "survived" not in r.stdout
    assert r.returncode == -signal.SIGTERM


def test_the_workers_get_the_signal_first() -> None:
    r = _child(
        """
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        handler = SigtermUnwinds()
        handler.workers.add(worker.pid)
        handler.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            print("worker ended by", -worker.wait(10), flush=True)
        """
    )
    assert f"worker ended by {int(signal.SIGTERM)}" in r.stdout, r.stdout


@pytest.mark.parametrize("handler", ["signal.SIG_IGN", "lambda *_: print('theirs', flush=True)"])
def test_a_handler_someone_else_set_is_kept(handler: str) -> None:
    r = _child(
        f"""
        signal.signal(signal.SIGTERM, {handler})
        ours = SigtermUnwinds()
        ours.install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        ours.uninstall()
        print("still here", flush=True)
        """
    )
    assert r.returncode == 0 and "still here" in r.stdout, r.stdout


def test_uninstall_restores_the_default_and_shield_ignores_sigint_until_then() -> None:
    r = _child(
        """
        ours = SigtermUnwinds()
        ours.install()
        ours.shield()  # an interrupted xdist worker tearing down: execnet's SIGINT waits
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("shielded", flush=True)
        ours.uninstall()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("restored", flush=True)
        """
    )
    assert r.returncode == 0 and "shielded" in r.stdout and "restored" in r.stdout, r.stdout
