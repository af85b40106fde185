"""ClonePool (machine/pool.py) without a VM, over a fake Templates: one VM made ahead on
its own long-lived thread and handed out renamed; only the configuration taken last is
refilled; a pooled VM that died is stopped, not handed out; a failure in the background
is not retried until the next take; close() stops what the pool holds, waits for the
VM being made, and ends the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.errors import MicroVMError
from pytest_microvm.machine.host import HostReport
from pytest_microvm.machine.pool import ClonePool
from pytest_microvm.machine.snapshot.errors import SnapshotError
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.vm import Runstate
from tests.snapshot_fakes import guest_image, host_report

POOL_LOGGER = "pytest_microvm.machine.pool"
WAIT = 5.0  # seconds: every wait on the pool's thread is bounded by this


def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)


class FakeQemu:
    def __init__(self) -> None:
        self.exit_code: int | None = None

    def returncode(self) -> int | None:
        return self.exit_code


class FakeClient:
    def __init__(self) -> None:
        self.connected = True


class FakeVM:
    """What ClonePool uses of a started VM, including what tells whether it is alive."""

    def __init__(self, name: str, config: VMConfig) -> None:
        self.name = name
        self.made_as = name
        self.config = config
        self.runstate = Runstate.RUNNING
        self.qemu: FakeQemu | None = FakeQemu()
        self._client = FakeClient()
        self.stops: list[bool] = []

    @property
    def client(self) -> FakeClient:
        if self.runstate is not Runstate.RUNNING:  # as MicroVM.client: only while it runs
            raise MicroVMError(f"{self.name} is {self.runstate.value}, not running")
        return self._client

    def rename(self, name: str) -> None:
        self.name = name

    def stop(self, *, graceful: bool = True, timeout: float = 10.0, keep: bool | None = None) -> None:
        self.stops.append(graceful)
        self.runstate = Runstate.STOPPED


class FakeTemplates:
    """Templates.start as ClonePool calls it: records each call, hands out FakeVMs.

    With ``gated``, each VM made ahead ("pooled") waits for a permit from :meth:`allow`,
    so a test decides when the pool's thread gets one.
    """

    def __init__(self, *, fail_pooled: bool = False, gated: bool = False) -> None:
        self.fail_pooled = fail_pooled
        self.gate = threading.Semaphore(0) if gated else None
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self.vms: list[FakeVM] = []
        self.entered = 0  # pooled starts begun (with a gate: also those waiting at it)

    def start(
        self,
        config: VMConfig,
        *,
        host: HostReport | None = None,
        name: str = "vm",
        qemu_args_hook: Any = None,
    ) -> FakeVM:
        if name == "pooled":
            with self.lock:
                self.entered += 1
        if name == "pooled" and self.gate is not None:
            assert self.gate.acquire(timeout=WAIT), "the test never let this pooled VM be made"
        with self.lock:
            self.calls.append({"config": config, "name": name, "host": host, "hooked": qemu_args_hook is not None})
        if self.fail_pooled and name == "pooled":
            raise SnapshotError("no template\nmore")
        vm = FakeVM(name, config)
        with self.lock:
            self.vms.append(vm)
        return vm

    def allow(self, n: int = 1) -> None:
        if self.gate is not None:
            self.gate.release(n)

    def names(self) -> list[str]:
        with self.lock:
            return [c["name"] for c in self.calls]

    def pooled(self, memory_mib: int | None = None) -> list[FakeVM]:
        """The VMs made ahead, in order (of one memory size, if given)."""
        with self.lock:
            return [
                vm
                for vm in self.vms
                if vm.made_as == "pooled" and (memory_mib is None or vm.config.memory_mib == memory_mib)
            ]


@pytest.fixture
def pools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ClonePool]]:
    """Makes pools over a fake Templates on a host that allows cloning; closes them all."""
    image = guest_image(tmp_path)
    monkeypatch.setattr("pytest_microvm.machine.pool.detect_host", lambda: host_report())
    monkeypatch.setattr("pytest_microvm.machine.pool.storage.image_for", lambda config: image)
    made: list[tuple[ClonePool, FakeTemplates]] = []

    def make(templates: FakeTemplates, size: int = 1) -> ClonePool:
        made.append((ClonePool(cast(Templates, templates), size), templates))
        return made[-1][0]

    yield make
    for pool, templates in made:
        templates.allow(100)  # a thread held at the gate gets through, and close() can join it
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(WAIT)
        assert not closer.is_alive(), "close() did not return"
        assert pool._thread is None or not pool._thread.is_alive()


def _ready(pool: ClonePool, memory_mib: int | None = None) -> int:
    with pool._cond:
        return sum(len(s.ready) for s in pool._slots if memory_mib is None or s.config.memory_mib == memory_mib)


def _active(pool: ClonePool) -> list[int]:
    with pool._cond:
        return [s.config.memory_mib for s in pool._slots if s.active]


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "microvm-clone-pool"]


A, B = VMConfig(), VMConfig(memory_mib=512)


def test_pool_makes_one_ahead_and_hands_it_out_renamed(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    first = cast(FakeVM, pool.take(VMConfig(), name="first"))
    assert first.made_as == "first"  # made inline: nothing was ready
    thread = pool._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    eventually(lambda: _ready(pool) == 1)
    assert sorted(fake.names()) == ["first", "pooled"]
    assert all(c["config"].image is not None for c in fake.calls)  # the slot's config names its image
    assert all(c["host"] == host_report() for c in fake.calls)  # the host detected once, passed on

    second = cast(FakeVM, pool.take(VMConfig(), name="second"))
    assert second.made_as == "pooled" and second.name == "second"
    assert "second" not in fake.names()  # no inline start for it
    eventually(lambda: _ready(pool) == 1)  # and the next one is made ahead
    assert fake.names().count("pooled") == 2 and pool._thread is thread
    time.sleep(0.1)
    assert fake.names().count("pooled") == 2  # size 1: one ahead, not more

    third = fake.pooled()[-1]
    assert third is not second
    pool.close()
    assert not thread.is_alive()
    assert third.stops == [False]  # the one not handed out is stopped, at once
    assert first.stops == [] and second.stops == []  # handed out: their takers' to stop


def test_pool_fills_up_to_its_size(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake, size=3)
    pool.take(A, name="first")
    eventually(lambda: _ready(pool) == 3)
    time.sleep(0.1)
    assert fake.names().count("pooled") == 3


def test_pool_refills_only_the_configuration_taken_last(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates(gated=True)
    pool = pools(fake, size=2)
    # A is taken (made inline); the pool's thread starts one of A and waits at the gate.
    assert cast(FakeVM, pool.take(A, name="a1")).made_as == "a1"
    eventually(lambda: fake.entered == 1)
    # B is taken before that one is done: A is no longer made ahead.
    assert cast(FakeVM, pool.take(B, name="b1")).made_as == "b1"
    assert _active(pool) == [512]
    fake.allow(100)  # from now on the thread may make as many as it wants
    eventually(lambda: _ready(pool, 512) == 2)
    time.sleep(0.2)  # room for a wrong refill of A
    # The one of A under way when B was taken is kept; no second one of A is made.
    assert len(fake.pooled(256)) == 1 and _ready(pool, 256) == 1
    assert len(fake.pooled(512)) == 2

    # A again: its ready VM is handed out, A is refilled, B (full) is left as it is.
    a2 = cast(FakeVM, pool.take(A, name="a2"))
    assert a2 is fake.pooled(256)[0] and a2.name == "a2"
    assert _active(pool) == [256]
    eventually(lambda: _ready(pool, 256) == 2)
    time.sleep(0.1)
    assert len(fake.pooled(256)) == 3 and len(fake.pooled(512)) == 2 and _ready(pool, 512) == 2

    # Taking B's now makes B the one refilled; A keeps its two until close.
    b2 = cast(FakeVM, pool.take(B, name="b2"))
    assert b2.made_as == "pooled" and b2.config.memory_mib == 512
    eventually(lambda: len(fake.pooled(512)) == 3 and _ready(pool, 512) == 2)
    assert _ready(pool, 256) == 2 and len(fake.pooled(256)) == 3
    held = [vm for vm in fake.pooled() if vm not in (a2, b2)]
    assert len(held) == 4
    pool.close()
    assert all(vm.stops == [False] for vm in held)
    assert a2.stops == [] and b2.stops == []


def _kill_by_runstate(vm: FakeVM) -> None:
    vm.runstate = Runstate.STOPPED


def _kill_qemu(vm: FakeVM) -> None:
    assert vm.qemu is not None
    vm.qemu.exit_code = -9


def _lose_qemu(vm: FakeVM) -> None:
    vm.qemu = None


def _drop_connection(vm: FakeVM) -> None:
    vm._client.connected = False


@pytest.mark.parametrize("death", [_kill_by_runstate, _kill_qemu, _lose_qemu, _drop_connection])
def test_pool_does_not_hand_out_a_pooled_vm_that_died(
    pools: Callable[..., ClonePool], death: Callable[[FakeVM], None]
) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    pool.take(A, name="first")
    eventually(lambda: _ready(pool) == 1)
    (dead,) = fake.pooled()
    death(dead)
    vm = cast(FakeVM, pool.take(A, name="second"))
    assert vm is not dead and vm.made_as == "second"  # made now instead
    assert dead.stops == [False] and dead.name == "pooled"  # stopped, never renamed
    eventually(lambda: _ready(pool) == 1)  # and replaced
    assert fake.pooled()[-1] is not dead


def test_pool_skips_a_dead_vm_for_a_live_one_behind_it(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake, size=2)
    pool.take(A, name="first")
    eventually(lambda: _ready(pool) == 2)
    dead, alive = fake.pooled()
    _kill_qemu(dead)
    vm = cast(FakeVM, pool.take(A, name="second"))
    assert vm is alive and vm.name == "second"
    assert dead.stops == [False] and alive.stops == []
    assert fake.names().count("second") == 0


def test_pool_failure_in_the_background_stops_trying_until_the_next_take(
    pools: Callable[..., ClonePool], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=POOL_LOGGER)
    fake = FakeTemplates(fail_pooled=True)
    pool = pools(fake)
    vm = cast(FakeVM, pool.take(A, name="first"))
    assert vm.made_as == "first"
    eventually(lambda: fake.names().count("pooled") == 1 and not _active(pool))
    time.sleep(0.3)  # a busy retry loop would make hundreds of calls here
    assert fake.names().count("pooled") == 1
    assert pool._thread is not None and pool._thread.is_alive()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["making a clone ahead failed: no template"]  # its first line only

    # The next take makes its own VM and asks the thread to try again, once.
    again = cast(FakeVM, pool.take(A, name="second"))
    assert again.made_as == "second"
    eventually(lambda: fake.names().count("pooled") == 2)
    time.sleep(0.1)
    assert fake.names().count("pooled") == 2


def test_pool_close_waits_for_the_vm_being_made_and_stops_it(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates(gated=True)
    pool = pools(fake)
    pool.take(A, name="first")
    eventually(lambda: fake.entered == 1)  # the thread is at the gate, making one
    closer = threading.Thread(target=pool.close)
    closer.start()
    eventually(lambda: pool._closed)
    time.sleep(0.1)
    assert closer.is_alive()  # close() waits for it: no timeout that would abandon it
    fake.allow()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert pool._thread is not None and not pool._thread.is_alive()
    (late,) = fake.pooled()
    assert late.stops == [False]  # not kept in a pool nobody will take from


def test_pool_after_close_makes_vms_inline_and_no_thread(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    pool.take(A, name="first")
    eventually(lambda: _ready(pool) == 1)
    (ahead,) = fake.pooled()
    thread = pool._thread
    pool.close()
    assert ahead.stops == [False] and thread is not None and not thread.is_alive()
    vm = cast(FakeVM, pool.take(A, name="late"))
    assert vm.made_as == "late" and pool._thread is thread  # no new thread
    time.sleep(0.1)
    assert fake.names().count("pooled") == 1
    pool.close()  # twice: nothing more to do


def test_pool_of_size_zero_never_starts_a_thread(pools: Callable[..., ClonePool]) -> None:
    threads = _pool_threads()
    fake = FakeTemplates()
    pool = pools(fake, size=0)
    for name in ("a", "b"):
        vm = cast(FakeVM, pool.take(A, name=name))
        assert vm.made_as == name
    assert fake.names() == ["a", "b"]
    assert pool._thread is None and _pool_threads() == threads
    pool.close()


def test_pool_does_not_make_ahead_what_cannot_be_a_clone(pools: Callable[..., ClonePool]) -> None:
    fake = FakeTemplates()
    pool = pools(fake)
    hook = cast(Any, lambda config, argv: argv)
    pool.take(A, name="hooked", qemu_args_hook=hook)
    pool.take(VMConfig(snapshot=False), name="plain")
    pool.take(VMConfig(rootfs="host"), name="host-root")
    assert [c["hooked"] for c in fake.calls] == [True, False, False]
    assert fake.names() == ["hooked", "plain", "host-root"]
    assert pool._thread is None and not pool._slots
