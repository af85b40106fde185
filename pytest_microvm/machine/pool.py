"""ClonePool: fresh VMs made ahead, so the next test's VM is ready when it asks.

Owns the background making of VMs and nothing else: what a VM is (a clone or a boot)
is :class:`~pytest_microvm.machine.snapshot.Templates`' decision.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pytest_microvm import _logging, _wait
from pytest_microvm.machine import storage
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import HostReport, detect_host
from pytest_microvm.machine.snapshot.key import why_not
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.vm import MicroVM, QemuArgsHook, Runstate

log = _logging.logger(__name__)


@dataclass
class _Slot:
    config: VMConfig
    ready: list[MicroVM] = field(default_factory=list)
    active: bool = True  # made ahead: the configuration last taken, and not after a failure


class ClonePool:
    """Clones made ahead, ``size`` for the configuration taken last.

    One long-lived thread makes them: QEMU and the backend die with the *thread* that
    spawned them (PR_SET_PDEATHSIG), so they must not come from short-lived threads. The
    thread lives until :meth:`close`, which stops every VM it still holds; a VM handed
    out is its taker's to stop, and must be stopped before close (the plugin's fixtures
    are). Only the configuration taken last is refilled: a suite whose tests vary their
    VMs does not keep an idle clone of every variant.
    """

    def __init__(self, templates: Templates, size: int = 1) -> None:
        self.templates = templates
        self.size = size
        self._cond = threading.Condition()
        self._slots: list[_Slot] = []  # VMConfig holds dicts: compared, not hashed
        self._closed = False
        self._thread: threading.Thread | None = None
        self._host: HostReport | None = None  # detected once: it runs `qemu --version`

    def take(self, config: VMConfig, *, name: str = "vm", qemu_args_hook: QemuArgsHook | None = None) -> MicroVM:
        """A started VM for ``config``: one made ahead if there is one, else made now.

        When the pool's VM is still being made, another is made here at once rather than
        waited for: on two cores the two overlap (a 50-test suite took 20.9 s so, 28.1 s
        waiting), and the pool's is ready for the next test.
        """
        self._host = self._host or detect_host()
        host = self._host.for_arch(config.arch)
        if self.size < 1 or why_not(config, host, hooked=qemu_args_hook is not None) is not None:
            return self.templates.start(config, host=host, name=name, qemu_args_hook=qemu_args_hook)
        config = config.with_(image=storage.image_for(config))
        stale: list[MicroVM] = []
        with self._cond:
            slot = self._slot(config)
            vm = None
            while slot.ready and vm is None:
                candidate = slot.ready.pop(0)
                if _alive(candidate):
                    vm = candidate
                else:
                    stale.append(candidate)  # its QEMU died while it waited
            for other in self._slots:
                other.active = other is slot
            self._cond.notify_all()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._fill, name="microvm-clone-pool", daemon=True)
                self._thread.start()
        for dead in stale:
            dead.stop(graceful=False)
        if vm is not None:
            vm.rename(name)
            return vm
        return self.templates.start(config, host=host, name=name)

    def _slot(self, config: VMConfig) -> _Slot:
        for slot in self._slots:
            if slot.config == config:
                return slot
        self._slots.append(_Slot(config))
        return self._slots[-1]

    def _fill(self) -> None:
        while True:
            with self._cond:
                todo = None
                while todo is None:
                    if self._closed:
                        return
                    todo = next((s for s in self._slots if s.active and len(s.ready) < self.size), None)
                    if todo is None:
                        self._cond.wait()
            try:
                vm = self.templates.start(todo.config, host=self._host, name="pooled")
            except Exception as exc:  # the taker makes its own VM and sees the error itself
                log.warning("making a clone ahead failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
                with self._cond:
                    todo.active = False  # no retry loop: the next take() asks again
                continue
            with self._cond:
                if not self._closed:
                    todo.ready.append(vm)
                    continue
            vm.stop(graceful=False)
            return

    def close(self) -> None:
        """Stop the clones not handed out and the thread; nothing of the pool is left.

        Waits for a VM being made (bounded by its boot timeout) rather than leaving it to
        die with the process: a VM abandoned so would leave its directory behind.
        """
        with self._cond:
            self._closed = True
            vms = [vm for slot in self._slots for vm in slot.ready]
            self._slots.clear()
            self._cond.notify_all()
            thread = self._thread
        for vm in vms:
            vm.stop(graceful=False)
        if thread is not None:
            _wait.join(thread)


def _alive(vm: MicroVM) -> bool:
    return (
        vm.runstate is Runstate.RUNNING
        and vm.qemu is not None
        and vm.qemu.returncode() is None
        and (vm.client.connected)
    )
