"""machine/snapshot/policy.py: clone-else-boot. ``Templates.start`` over stand-ins for its
``save``, ``restore`` and ``boot`` callables (the save writes a template's files, so the
templates in the cache are real): a template made on first need and reused, a broken one
remade once, another fault tried once more, a host that cannot hold a clone or a
template that cannot be made answered with a boot and one warning, a configuration that
cannot be a clone booted without a template. Then the defaults: ``_restore`` turning what
keeps a clone from coming up into a SnapshotError, ``_boot``. The pool that makes clones
ahead is tests/unit/test_pool.py.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.errors import BootError, ConfigError, GuestError, MicroVMError, ProtocolError
from pytest_microvm.image import GuestImage
from pytest_microvm.machine.host import HostReport
from pytest_microvm.machine.snapshot import policy
from pytest_microvm.machine.snapshot.errors import CannotClone, ShmTooSmall, SnapshotError, TemplateBroken
from pytest_microvm.machine.snapshot.key import template_key
from pytest_microvm.machine.snapshot.policy import Templates
from pytest_microvm.machine.snapshot.store import Template, templates_dir
from pytest_microvm.machine.snapshot.strategies import save_template
from pytest_microvm.machine.vm import MicroVM, QemuArgsHook
from tests.snapshot_fakes import MIB, guest_image, host_report, write_template

POLICY_LOGGER = "pytest_microvm.machine.snapshot.policy"


class FakeVM:
    """What Templates.start hands back: a clone or a boot, and what it was made from."""

    def __init__(self, name: str, kind: str, config: VMConfig, **kwargs: Any) -> None:
        self.name = name
        self.kind = kind
        self.config = config
        self.kwargs = kwargs


class Fakes:
    """Templates' ``save``, ``restore`` and ``boot`` without QEMU. The save writes the files
    a saved guest leaves (a sparse RAM file of the config's memory, a device state) and
    returns a token; each restore does what ``restores`` says next (None: a clone)."""

    def __init__(self, cache: Path, image: GuestImage) -> None:
        self.cache = cache
        self.image = image
        self.image_for_calls = 0
        self.saves: list[dict[str, Any]] = []
        self.save_error: BaseException | None = None
        self.restores: list[BaseException | None] = []
        self.clones: list[FakeVM] = []  # every restore tried, failed or not
        self.boots: list[FakeVM] = []

    def image_for(self, config: VMConfig) -> GuestImage:
        self.image_for_calls += 1
        return self.image

    def save(self, config: VMConfig, image: GuestImage, host: HostReport, staging: Path) -> str:
        if self.save_error is not None:
            raise self.save_error
        self.saves.append({"config": config, "image": image, "host": host, "staging": staging})
        with open(staging / "ram", "wb") as f:
            f.truncate(config.memory_mib * MIB)
        (staging / "state").write_bytes(b"device state")
        return f"token{len(self.saves)}"

    def restore(self, config: VMConfig, template: Template, host: HostReport, name: str) -> MicroVM:
        vm = FakeVM(name, "clone", config, template=template, host=host)
        self.clones.append(vm)
        outcome = self.restores.pop(0)
        if outcome is not None:
            raise outcome
        return cast(MicroVM, vm)

    def boot(self, config: VMConfig, host: HostReport, hook: QemuArgsHook | None, name: str) -> MicroVM:
        vm = FakeVM(name, "boot", config, host=host, qemu_args_hook=hook)
        self.boots.append(vm)
        return cast(MicroVM, vm)

    def templates(self) -> Templates:
        return Templates(self.cache, save=self.save, restore=self.restore, boot=self.boot)

    def template(self, n: int) -> Template:
        """The template the ``n``-th restore was given."""
        return cast(Template, self.clones[n].kwargs["template"])


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fakes:
    made = Fakes(tmp_path / "cache", guest_image(tmp_path))
    # Templates.start builds (or finds) the config's image: the one seam it does not take.
    monkeypatch.setattr("pytest_microvm.machine.snapshot.policy.storage.image_for", made.image_for)
    return made


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _start(templates: Templates, config: VMConfig | None = None, **kwargs: Any) -> FakeVM:
    return cast(FakeVM, templates.start(config or VMConfig(), host=host_report(), **kwargs))


def test_the_defaults_boot_real_guests() -> None:
    defaults = {name: p.default for name, p in inspect.signature(Templates).parameters.items()}
    assert defaults["save"] is save_template
    assert defaults["restore"] is policy._restore and defaults["boot"] is policy._boot


def test_a_clone_of_a_template_made_on_first_need_then_reused(fakes: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.restores = [None, None]
    templates = fakes.templates()
    vm = _start(templates, name="t1")
    assert vm.kind == "clone" and vm.name == "t1" and vm is fakes.clones[-1]
    assert vm.config.image is fakes.image and vm.kwargs["host"] == host_report()
    (save,) = fakes.saves
    assert save["image"] is fakes.image and save["config"].image is fakes.image and save["host"] == host_report()
    template = fakes.template(0)
    key = template_key(VMConfig(image=fakes.image), fakes.image, host_report())
    assert template == Template.load(templates_dir(fakes.cache) / key)  # in the cache, under the config's key
    assert template.token == "token1" and template.memory_mib == VMConfig().memory_mib
    again = _start(templates, name="t2")
    assert again.kind == "clone" and len(fakes.saves) == 1 and fakes.template(1) == template  # saved once
    assert not fakes.boots and not caplog.records


def test_a_template_in_the_cache_is_cloned_without_a_save_and_its_use_recorded(fakes: Fakes) -> None:
    config = VMConfig(memory_mib=64)
    key = template_key(config.with_(image=fakes.image), fakes.image, host_report())
    directory = templates_dir(fakes.cache) / key
    write_template(directory, key=key, template_id="theirs", memory_mib=64)  # made by another process
    days_ago = time.time() - 3 * 86400
    os.utime(directory / "template.json", (days_ago, days_ago))
    fakes.restores = [None]
    assert _start(fakes.templates(), config).kind == "clone"
    assert not fakes.saves and fakes.template(0).id == "theirs"
    assert (directory / "template.json").stat().st_mtime > time.time() - 60  # a use: kept from forget_unused


def test_a_restore_that_fails_once_remakes_the_template_and_clones(
    fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.restores = [TemplateBroken("the state file is corrupt"), None]
    vm = _start(fakes.templates(), name="t1")
    assert vm.kind == "clone" and vm.name == "t1" and vm is fakes.clones[-1]
    assert vm.config.image is not None and vm.config.image.key == "imagekey0123"
    first, second = fakes.template(0), fakes.template(1)
    # The broken one discarded (else the second restore would have had it again), the remade one kept.
    assert len(fakes.saves) == 2 and second.id != first.id and second.directory == first.directory
    assert Template.load(second.directory) == second and second.token == "token2"
    assert vm.kwargs["template"] is second
    assert len(fakes.clones) == 2 and not fakes.boots
    assert len(_warnings(caplog, "making it again")) == 1
    assert not _warnings(caplog, "booting instead of cloning")


def test_a_fault_outside_the_template_keeps_it_and_tries_once_more(
    fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.restores = [SnapshotError("the hot-plug was refused"), None]
    vm = _start(fakes.templates(), name="t1")
    assert vm.kind == "clone" and len(fakes.clones) == 2
    # Shared with other processes: kept, and the second try has the same one.
    assert len(fakes.saves) == 1 and fakes.template(0) == fakes.template(1)
    assert Template.load(fakes.template(0).directory).id == fakes.template(0).id
    assert len(_warnings(caplog, "trying once more")) == 1
    assert not _warnings(caplog, "booting instead of cloning")


def test_a_restore_that_fails_twice_boots_and_says_why_once(fakes: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.restores = [TemplateBroken("restore broke\ndetails"), TemplateBroken("restore broke again\ndetails")]
    templates = fakes.templates()
    vm = _start(templates, name="t1")
    assert vm.kind == "boot" and vm.name == "t1" and vm.kwargs["host"] == host_report()
    assert vm.config.image is fakes.image and vm.kwargs["qemu_args_hook"] is None
    first, second = fakes.template(0), fakes.template(1)
    assert len(fakes.saves) == 2 and first.id != second.id
    assert not first.directory.exists()  # both discarded: the second was the remade first
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1
    assert "restoring its snapshot failed twice: restore broke again" in warned[0]
    assert "details" not in warned[0]  # the first line of the error only

    # The same key again: a boot at once, no third template, no second warning.
    again = _start(templates, name="t2")
    assert again.kind == "boot" and again.name == "t2"
    assert len(fakes.saves) == 2 and len(fakes.clones) == 2
    assert len(_warnings(caplog, "booting instead of cloning")) == 1

    # Another configuration (another key) is not given up on.
    fakes.restores = [None]
    other = _start(templates, VMConfig(memory_mib=512), name="t3")
    assert other.kind == "clone" and len(fakes.saves) == 3


def test_a_tmpfs_too_small_boots_at_once_and_keeps_the_template(fakes: Fakes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.restores = [ShmTooSmall("/dev/shm has 10 MiB free, a clone needs 256 MiB")]
    vm = _start(fakes.templates())
    assert vm.kind == "boot"
    assert len(fakes.saves) == 1 and Template.load(fakes.template(0).directory) == fakes.template(0)  # not discarded
    assert len(fakes.clones) == 1 and not fakes.restores
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1 and "a clone needs 256 MiB" in warned[0]


@pytest.mark.parametrize(
    "error",
    [SnapshotError("the guest did not release its vsock device"), BootError("the guest did not release its vsock")],
    ids=["snapshot-error", "boot-error"],
)
def test_a_template_that_cannot_be_made_boots_and_is_not_tried_again(
    fakes: Fakes, caplog: pytest.LogCaptureFixture, error: MicroVMError
) -> None:
    caplog.set_level(logging.WARNING, logger=POLICY_LOGGER)
    fakes.save_error = error
    templates = fakes.templates()
    assert _start(templates).kind == "boot"
    fakes.save_error = AssertionError("save called again for a key given up on")
    assert _start(templates).kind == "boot"
    assert not fakes.clones and len(fakes.boots) == 2
    warned = _warnings(caplog, "booting instead of cloning")
    assert len(warned) == 1 and "could not be made: the guest did not release" in warned[0]


@pytest.mark.parametrize(
    "config", [VMConfig(snapshot=False), VMConfig(rootfs="host")], ids=["no-snapshot", "host-root"]
)
def test_a_config_that_cannot_be_a_clone_boots_without_a_template(
    fakes: Fakes, caplog: pytest.LogCaptureFixture, config: VMConfig
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLICY_LOGGER)
    hook = cast(Any, lambda config, argv: argv)
    vm = _start(fakes.templates(), config, name="b", qemu_args_hook=hook)
    assert vm.kind == "boot" and vm.name == "b" and vm.kwargs["qemu_args_hook"] is hook
    assert vm.config is config and vm.kwargs["host"] == host_report()
    assert not fakes.saves and not fakes.clones and fakes.image_for_calls == 0  # not even an image
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the user asked for it: no warning
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG] != []  # but it is said why


def test_a_hook_alone_makes_a_vm_boot(fakes: Fakes) -> None:
    hook = cast(Any, lambda config, argv: argv)
    vm = _start(fakes.templates(), VMConfig(), qemu_args_hook=hook)
    assert vm.kind == "boot" and vm.kwargs["qemu_args_hook"] is hook and not fakes.saves


# ---- _restore: what keeps a clone from coming up is a SnapshotError --------------------------------


def _failing_restore(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def restore_clone(config: VMConfig, template: Template, host: HostReport, *, name: str) -> MicroVM:
        calls.append({"config": config, "template": template, "host": host, "name": name})
        raise error

    monkeypatch.setattr(policy, "restore_clone", restore_clone)
    return calls


@pytest.mark.parametrize(
    "error",
    [
        BootError("the probe failed: agent gone\nmore", console_tail="console tail", qemu_stderr="qemu said"),
        GuestError("QEMU exited with status 1", qemu_stderr="qemu said"),
        ProtocolError("HELLO with a bad token"),
    ],
)
def test_restore_turns_guest_and_protocol_errors_into_snapshot_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: MicroVMError
) -> None:
    calls = _failing_restore(monkeypatch, error)
    template = Template(tmp_path, "key", "id0", "token", 8)
    with pytest.raises(SnapshotError) as info:
        policy._restore(VMConfig(), template, host_report(), "c1")
    assert calls == [{"config": VMConfig(), "template": template, "host": host_report(), "name": "c1"}]
    assert type(info.value) is SnapshotError and info.value.__cause__ is error
    first = str(error).splitlines()[0]
    assert str(info.value).startswith(f"the clone did not come up: {first}")
    expected = error if isinstance(error, GuestError) else None
    assert info.value.console_tail == (expected.console_tail if expected else "")
    assert info.value.qemu_stderr == (expected.qemu_stderr if expected else "")


@pytest.mark.parametrize(
    "error",
    [
        TemplateBroken("the state did not load"),
        SnapshotError("the hot-plug was refused"),
        CannotClone("no O_TMPFILE"),
        ConfigError("no QEMU"),
    ],
)
def test_restore_passes_snapshot_and_config_errors_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: MicroVMError
) -> None:
    _failing_restore(monkeypatch, error)
    with pytest.raises(type(error)) as info:
        policy._restore(VMConfig(), Template(tmp_path, "key", "id0", "token", 8), host_report(), "c1")
    assert info.value is error


def test_restore_hands_back_the_started_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clone = FakeVM("c1", "clone", VMConfig())
    monkeypatch.setattr(policy, "restore_clone", lambda config, template, host, *, name: clone)
    restored: object = policy._restore(VMConfig(), Template(tmp_path, "key", "id0", "token", 8), host_report(), "c1")
    assert restored is clone


# ---- _boot ------------------------------------------------------------------------------------------


def test_boot_starts_a_plain_microvm(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[FakeVM] = []

    class Booted(FakeVM):
        def __init__(self, config: VMConfig, **kwargs: Any) -> None:
            super().__init__(kwargs.pop("name"), "boot", config, **kwargs)
            self.started = False
            made.append(self)

        def start(self) -> Booted:
            self.started = True
            return self

    monkeypatch.setattr(policy, "MicroVM", Booted)
    config, host, hook = VMConfig(), host_report(), cast(Any, lambda config, argv: argv)
    vm = cast(Booted, policy._boot(config, host, hook, "b1"))
    assert made == [vm] and vm.started
    assert vm.name == "b1" and vm.config is config
    assert vm.kwargs == {"host": host, "qemu_args_hook": hook}  # a boot: no launch of its own
