"""machine/snapshot/store.py: a template on disk (loading it and its checks, its id,
discarding only its own making), making one through ``make_template``'s ``save``
callable (here a stand-in that writes the files a saved guest leaves in the staging
directory), remaking a damaged one, recording uses and forgetting templates unused for
two weeks. How a real template is booted and saved is tests/unit/test_snapshot_strategies.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_microvm.cache import ENV_VAR
from pytest_microvm.machine.snapshot.errors import SnapshotError, TemplateBroken
from pytest_microvm.machine.snapshot.store import Template, forget_unused, make_template, templates_dir
from tests.snapshot_fakes import MIB, allocated, rewrite_meta, write_template

# ---- a template on disk ----------------------------------------------------------------------


def test_template_load_reads_a_sound_template(tmp_path: Path) -> None:
    directory = tmp_path / "somekey"
    write_template(directory)
    template = Template.load(directory)
    assert template == Template(directory, "somekey", "id-one", "tok", 8)
    assert template.ram == directory / "ram" and template.state == directory / "state"
    assert template.current_id() == "id-one"


def _json_a_directory(directory: Path) -> None:
    (directory / "template.json").unlink()
    (directory / "template.json").mkdir()


DAMAGE: dict[str, Callable[[Path], Any]] = {
    "no template.json": lambda d: (d / "template.json").unlink(),
    "template.json a directory": _json_a_directory,
    "template.json not JSON": lambda d: (d / "template.json").write_text('{"key": "somekey", "id"'),
    "template.json a list": lambda d: (d / "template.json").write_text('["somekey"]'),
    "no key": lambda d: rewrite_meta(d, key=None),
    "no id": lambda d: rewrite_meta(d, id=None),
    "no token": lambda d: rewrite_meta(d, token=None),
    "no memory_mib": lambda d: rewrite_meta(d, memory_mib=None),
    "memory_mib not a number": lambda d: rewrite_meta(d, memory_mib="lots"),
    "memory_mib a list": lambda d: rewrite_meta(d, memory_mib=[8]),
    "memory_mib other than the RAM": lambda d: rewrite_meta(d, memory_mib=16),
    "no RAM": lambda d: (d / "ram").unlink(),
    "RAM short": lambda d: os.truncate(d / "ram", 8 * MIB - 4096),
    "RAM long": lambda d: os.truncate(d / "ram", 8 * MIB + 1),
    "RAM empty": lambda d: os.truncate(d / "ram", 0),
    "no state": lambda d: (d / "state").unlink(),
    "state empty": lambda d: (d / "state").write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_template_load_refuses_a_damaged_template(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "somekey"
    write_template(directory)
    DAMAGE[damage](directory)
    with pytest.raises(TemplateBroken, match="snapshot template somekey is") as info:
        Template.load(directory)
    assert isinstance(info.value, SnapshotError)


def test_template_load_of_a_missing_directory_is_broken(tmp_path: Path) -> None:
    with pytest.raises(TemplateBroken, match="incomplete"):
        Template.load(tmp_path / "nothing")


def test_current_id_is_the_id_now_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "somekey"
    write_template(directory, template_id="first")
    template = Template.load(directory)
    assert template.current_id() == "first"
    rewrite_meta(directory, id="second")  # remade by another process
    assert template.current_id() == "second" and template.id == "first"
    (directory / "template.json").write_text("not json")
    assert template.current_id() is None
    shutil.rmtree(directory)
    assert template.current_id() is None


def test_discard_removes_its_own_template(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    write_template(directory)
    Template.load(directory).discard()
    assert not directory.exists()


def test_discard_of_an_old_template_keeps_the_one_made_since(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    write_template(directory, template_id="old")
    old = Template.load(directory)
    shutil.rmtree(directory)
    write_template(directory, template_id="new")  # another process found it broken and remade it
    old.discard()
    assert Template.load(directory).id == "new"  # still there, whole
    Template.load(directory).discard()
    assert not directory.exists()


def test_discard_removes_a_template_whose_id_cannot_be_read(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    write_template(directory, template_id="mine")
    template = Template.load(directory)
    (directory / "template.json").write_text("[1, 2")  # half written: nobody's
    template.discard()
    assert not directory.exists()
    template.discard()  # already gone: nothing to do, no error
    assert not directory.exists()


def test_discard_removes_a_template_without_an_id(tmp_path: Path) -> None:
    directory = tmp_path / "templates" / "somekey"
    write_template(directory, template_id="mine")
    template = Template.load(directory)
    rewrite_meta(directory, id=None)
    template.discard()
    assert not directory.exists()


# ---- making a template -------------------------------------------------------------------------


class FakeSave:
    """``make_template``'s ``save`` without QEMU: writes the RAM file (sparse) and the device
    state into the staging directory, as a saved guest leaves them, and returns its token."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.error: BaseException | None = None
        self.ram_mib_off = 0  # a RAM file this many MiB off the memory size asked for
        self.memory_mib = 0  # set by _make: the size the template is made for
        self.stagings: list[Path] = []
        self.tokens: list[str] = []

    def __call__(self, staging: Path) -> str:
        self.stagings.append(staging)
        # A directory of its own beside the final one, not yet under the key's name.
        assert staging.is_dir() and staging.parent == templates_dir(self.cache)
        assert staging.name.startswith(".") and not list(staging.iterdir())
        with open(staging / "ram", "wb") as f:
            f.truncate((self.memory_mib + self.ram_mib_off) * MIB)
        if self.error is not None:
            raise self.error
        (staging / "state").write_bytes(b"device state " * 100)
        self.tokens.append(secrets.token_hex(16))
        return self.tokens[-1]


@pytest.fixture
def save(tmp_path: Path) -> FakeSave:
    return FakeSave(tmp_path)


def _make(save: FakeSave, key: str = "somekey", memory_mib: int = 64) -> Template:
    save.memory_mib = memory_mib
    return make_template(key, memory_mib, save, save.cache)


def _entries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in templates_dir(tmp_path).iterdir())


def test_templates_dir_is_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert templates_dir(tmp_path) == tmp_path / "templates"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "default"))  # the cache root, as a user sets it
    assert templates_dir() == tmp_path / "default" / "templates"


def test_make_template_saves_and_names_it(tmp_path: Path, save: FakeSave) -> None:
    template = _make(save)
    final = templates_dir(tmp_path) / "somekey"
    (staging,) = save.stagings
    (token,) = save.tokens
    assert staging != final and not staging.exists()  # renamed into place
    meta = json.loads((final / "template.json").read_text())
    assert meta["key"] == "somekey" and meta["token"] == token and meta["memory_mib"] == 64
    assert isinstance(meta["id"], str) and len(meta["id"]) == 16 and int(meta["id"], 16) >= 0
    assert time.time() - 60 < meta["made"] <= time.time()
    assert template == Template(final, "somekey", meta["id"], token, 64)
    assert template == Template.load(final)
    assert (final / "state").read_bytes() == b"device state " * 100
    assert allocated(final / "ram") < MIB  # the RAM stays sparse
    assert _entries(tmp_path) == ["somekey", "somekey.lock"]  # no staging directory left


def test_make_template_uses_a_sound_one_without_saving(tmp_path: Path, save: FakeSave) -> None:
    first = _make(save)
    again = _make(save)
    assert again == first and len(save.stagings) == 1
    # One written by another process (or an earlier run) is as good.
    directory = templates_dir(tmp_path) / "other"
    write_template(directory, key="other", template_id="theirs", memory_mib=64)
    assert _make(save, "other") == Template(directory, "other", "theirs", "tok", 64)
    assert len(save.stagings) == 1


@pytest.mark.parametrize(
    "damage", ["RAM short", "no state", "state empty", "no template.json", "template.json not JSON"]
)
def test_make_template_remakes_a_damaged_one_with_a_new_id(tmp_path: Path, save: FakeSave, damage: str) -> None:
    first = _make(save)
    DAMAGE[damage](first.directory)
    remade = _make(save)
    assert len(save.stagings) == 2
    assert remade.directory == first.directory and remade.id != first.id
    assert remade.token == save.tokens[1]
    assert Template.load(first.directory) == remade
    assert first.current_id() == remade.id  # the old object sees it was remade
    assert _entries(tmp_path) == ["somekey", "somekey.lock"]


def test_make_template_that_fails_leaves_nothing(tmp_path: Path, save: FakeSave) -> None:
    save.error = SnapshotError("the guest did not release its vsock device")
    with pytest.raises(SnapshotError, match="did not release") as info:
        _make(save)
    assert info.value is save.error
    assert len(save.stagings) == 1 and not save.stagings[0].exists()  # the half-made RAM went with it
    assert _entries(tmp_path) == ["somekey.lock"]
    # The next call tries again (and, the fault gone, makes it).
    save.error = None
    assert _make(save).current_id() is not None and len(save.stagings) == 2


def test_making_a_template_removes_those_unused_for_two_weeks(tmp_path: Path, save: FakeSave) -> None:
    old = _make(save, "oldkey")
    recent = _make(save, "recentkey")
    weeks_ago = time.time() - 15 * 86400
    os.utime(old.directory / "template.json", (weeks_ago, weeks_ago))
    _make(save, "newkey")
    assert not old.directory.exists()  # unused for 15 days: gone
    assert recent.directory.exists() and (templates_dir(tmp_path) / "newkey").exists()
    # Finding a template in the cache sweeps nothing: only making one does.
    os.utime(recent.directory / "template.json", (weeks_ago, weeks_ago))
    _make(save, "newkey")
    assert recent.directory.exists()


def test_forget_unused_returns_what_it_removed(tmp_path: Path, save: FakeSave) -> None:
    a, b = _make(save, "akey"), _make(save, "bkey")
    days_ago = time.time() - 3 * 86400
    os.utime(a.directory / "template.json", (days_ago, days_ago))
    assert forget_unused(templates_dir(tmp_path), days=2) == ["akey"]
    assert not a.directory.exists() and b.directory.exists()
    assert forget_unused(templates_dir(tmp_path)) == []  # two weeks by default: b is fresh


def test_a_use_is_recorded_at_most_once_a_day(save: FakeSave) -> None:
    template = _make(save, "k")
    meta = template.directory / "template.json"
    hour_ago, days_ago = time.time() - 3600, time.time() - 3 * 86400
    os.utime(meta, (hour_ago, hour_ago))
    template.touch()
    assert meta.stat().st_mtime == pytest.approx(hour_ago)  # used today already: no write
    os.utime(meta, (days_ago, days_ago))
    template.touch()
    assert meta.stat().st_mtime > time.time() - 60
    assert forget_unused(template.directory.parent, days=1) == []


def test_make_template_refuses_what_it_made_wrong(tmp_path: Path, save: FakeSave) -> None:
    save.ram_mib_off = -1  # a RAM file that does not match the memory size
    with pytest.raises(TemplateBroken, match="damaged"):
        _make(save)
    assert _entries(tmp_path) == ["somekey.lock"]  # never under its name
