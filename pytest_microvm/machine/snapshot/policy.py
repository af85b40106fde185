"""Clone-else-boot: the one place that decides whether a fresh VM is a clone or a boot.

A clone where the configuration allows one (:func:`.key.why_not`); a template made on
first need; a template whose state does not load remade once; a clone that fails for any
other reason tried once more; after that, or when the host cannot hold a clone, a boot,
with a warning that says why (once per reason and process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from pytest_microvm import _logging
from pytest_microvm.cache import cache_dir
from pytest_microvm.errors import GuestError, MicroVMError, ProtocolError
from pytest_microvm.image import GuestImage
from pytest_microvm.machine import launch, storage
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.machine.host import HostReport, detect_host
from pytest_microvm.machine.snapshot.errors import CannotClone, SnapshotError, TemplateBroken, first_line
from pytest_microvm.machine.snapshot.key import template_key, why_not
from pytest_microvm.machine.snapshot.store import Template, make_template
from pytest_microvm.machine.snapshot.strategies import restore_clone, save_template
from pytest_microvm.machine.vm import MicroVM, QemuArgsHook

log = _logging.logger(__name__)


Save = Callable[[VMConfig, GuestImage, HostReport, Path], str]
Restore = Callable[[VMConfig, Template, HostReport, str], MicroVM]
Boot = Callable[[VMConfig, HostReport, "QemuArgsHook | None", str], MicroVM]


def _restore(config: VMConfig, template: Template, host: HostReport, name: str) -> MicroVM:
    try:
        return restore_clone(config, template, host, name=name)
    except SnapshotError:
        raise
    except (GuestError, ProtocolError) as exc:
        # Anything else that keeps a clone from coming up (an agent that refused CLONE, a
        # probe cut short) is the clone's problem: the caller boots instead.
        detail = exc if isinstance(exc, GuestError) else None
        raise SnapshotError(
            f"the clone did not come up: {first_line(exc)}",
            console_tail=detail.console_tail if detail else "",
            qemu_stderr=detail.qemu_stderr if detail else "",
        ) from exc


def _boot(config: VMConfig, host: HostReport, hook: QemuArgsHook | None, name: str) -> MicroVM:
    return launch.start(lambda: MicroVM(config, host=host, qemu_args_hook=hook, name=name))


class Templates:
    """The templates one process uses: made on first need, repaired once, then given up on.

    ``save``, ``restore`` and ``boot`` are how a template is made, a clone started and a
    VM booted (tests give stand-ins; the defaults boot real guests).
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | None = None,
        *,
        save: Save = save_template,
        restore: Restore = _restore,
        boot: Boot = _boot,
    ) -> None:
        self.cache = cache  # the cache root's override; None: the default, resolved at use
        self._save, self._restore, self._boot = save, restore, boot
        self._lock = threading.Lock()
        self._broken: dict[str, str] = {}  # key -> why this process boots instead
        self._warned: set[str] = set()

    def warn_once(self, why: str) -> None:
        with self._lock:
            if why in self._warned:
                return
            self._warned.add(why)
        log.warning("booting instead of cloning: %s", why)

    def start(
        self,
        config: VMConfig,
        *,
        host: HostReport | None = None,
        qemu_args_hook: QemuArgsHook | None = None,
        name: str = "vm",
    ) -> MicroVM:
        """A started VM for ``config``: a clone when possible, else a boot (see why_not).

        A ``qemu_args_hook`` could make a clone's command line differ from its template's,
        so a VM with one always boots: pass None when the hook would change nothing.
        """
        host = (host or detect_host()).for_arch(config.arch)
        reason = why_not(config, host, hooked=qemu_args_hook is not None)
        if reason is not None:
            log.debug("%s boots: %s", name, reason)
            return self._boot(config, host, qemu_args_hook, name)
        image = storage.image_for(config)
        config = config.with_(image=image)
        key = template_key(config, image, host)
        for attempt in (1, 2):
            if key in self._broken:
                break
            try:
                template = make_template(
                    key, config.memory_mib, lambda staging: self._save(config, image, host, staging),
                    cache_dir(self.cache),
                )  # fmt: skip
            except MicroVMError as exc:
                self._give_up(key, f"the snapshot template could not be made: {first_line(exc)}")
                break
            try:
                clone = self._restore(config, template, host, name)
                template.touch()
                return clone
            except CannotClone as exc:
                self._give_up(key, str(exc))
            except SnapshotError as exc:
                # A template whose state does not load (corrupt, or a QEMU changed in place)
                # is remade; other faults (a hot-plug refused, an agent that never came) are
                # tried once more. Only the state's own failure discards it: other processes
                # share the template.
                broken = isinstance(exc, TemplateBroken)
                if broken:
                    template.discard()
                if attempt == 2:
                    self._give_up(key, f"restoring its snapshot failed twice: {first_line(exc)}")
                else:
                    again = "making it again" if broken else "trying once more"
                    log.warning("restoring snapshot template %s failed (%s); %s", key, first_line(exc), again)
        self.warn_once(self._broken[key])
        return self._boot(config, host, qemu_args_hook, name)

    def _give_up(self, key: str, why: str) -> None:
        with self._lock:
            self._broken[key] = why
