"""The template store: saved guests in the image cache, made once, checked, remade, forgotten.

A template is a directory ``<cache>/templates/<key>/`` holding ``ram`` (the guest's
memory, the RAM file it ran on), ``state`` (its device state, a few hundred KiB) and
``template.json``. It is made in a staging directory and renamed into place, so a
reader never sees half of one, and it is never written again: clones map its ``ram``
(privately on the kernel path), so a damaged template is replaced by a new directory,
never repaired in place, and a discarded one lives on in the clones that still map it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pytest_microvm import _logging
from pytest_microvm.cache import cache_dir, cached_build
from pytest_microvm.machine.snapshot.errors import TemplateBroken

log = _logging.logger(__name__)

UNUSED_DAYS = 14  # a template no clone came from for this long is removed when another is made


@dataclass(frozen=True)
class Template:
    """A saved guest in the cache: its RAM file, device state, and how to reach its agent."""

    directory: Path
    key: str
    id: str  # this making of the template: a remade one under the same key has another
    token: str  # the template's token: every clone's agent says it in HELLO, before CLONE
    memory_mib: int

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @classmethod
    def load(cls, directory: Path) -> Template:
        """The template in ``directory``; TemplateBroken if any part is missing or wrong."""
        try:
            meta = json.loads((directory / "template.json").read_text())
            template = cls(directory, str(meta["key"]), str(meta["id"]), str(meta["token"]), int(meta["memory_mib"]))
            ram_size, state_size = template.ram.stat().st_size, template.state.stat().st_size
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TemplateBroken(f"snapshot template {directory.name} is incomplete: {exc}") from exc
        if ram_size != template.memory_mib << 20 or state_size == 0:
            raise TemplateBroken(
                f"snapshot template {directory.name} is damaged: RAM {ram_size} bytes for "
                f"{template.memory_mib} MiB, device state {state_size} bytes"
            )
        return template

    def current_id(self) -> str | None:
        """The id of the template now in this directory (None: none there)."""
        try:
            return str(json.loads((self.directory / "template.json").read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def touch(self) -> None:
        """Record a use (template.json's mtime, at most once a day) for forget_unused."""
        meta = self.directory / "template.json"
        with contextlib.suppress(OSError):
            if time.time() - meta.stat().st_mtime > 86400:
                os.utime(meta)

    def discard(self) -> None:
        """Remove it from the cache; the next use makes a new one. Only this making of it:
        another process may already have remade it (then that one stays)."""
        _discard(self.directory, self.id)


def _discard(directory: Path, template_id: str | None) -> None:
    with FileLock(str(directory) + ".lock"):
        try:
            found = json.loads((directory / "template.json").read_text()).get("id")
        except (OSError, ValueError, AttributeError):
            found = None
        if template_id is None or found in (None, template_id):
            shutil.rmtree(directory, ignore_errors=True)


def templates_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "templates"


def make_template(key: str, memory_mib: int, save: Callable[[Path], str], cache: Path | None = None) -> Template:
    """The template for ``key``, made now unless the cache has a sound one (one maker
    across processes: the others wait on its lock, then use it).

    ``save(staging)`` makes one: it writes ``staging/ram`` and ``staging/state`` (the
    snapshot strategies boot a guest and save it there) and returns the agent's token.
    """
    final = templates_dir(cache) / key
    try:
        return Template.load(final)
    except TemplateBroken:
        pass
    if final.exists():
        # Damaged (a crash while it was written, a full disk)? Judged again under the lock:
        # another process may have just remade it.
        with FileLock(str(final) + ".lock"):
            try:
                return Template.load(final)
            except TemplateBroken:
                shutil.rmtree(final, ignore_errors=True)  # clones that map it keep their copy

    def build(staging: Path) -> None:
        started = time.monotonic()
        token = save(staging)
        meta = {"key": key, "id": secrets.token_hex(8), "token": token, "memory_mib": memory_mib,
                "made": time.time()}  # fmt: skip
        (staging / "template.json").write_text(json.dumps(meta, indent=2) + "\n")
        Template.load(staging)  # what a user of it would check (TemplateBroken if a part is missing)
        for part in ("ram", "state", "template.json"):  # whole on disk before it has its name
            with open(staging / part, "rb+") as f:
                os.fsync(f.fileno())
        log.info("made snapshot template %s in %.2fs", key, time.monotonic() - started)

    if cached_build(final, build):
        forget_unused(final.parent)
    return Template.load(final)


def forget_unused(directory: Path, days: float = UNUSED_DAYS) -> list[str]:
    """Remove the templates in ``directory`` unused for ``days`` (keys change with every
    QEMU upgrade and image rebuild, and each template holds its guest's touched RAM).
    Returns the keys removed. Use is recorded by :meth:`Template.touch`."""
    cutoff = time.time() - days * 86400
    gone = []
    for meta in directory.glob("*/template.json"):
        try:
            unused = meta.stat().st_mtime < cutoff
        except OSError:
            continue
        if unused:
            _discard(meta.parent, None)
            gone.append(meta.parent.name)
    if gone:
        log.info("removed %d snapshot template(s) unused for %g days: %s", len(gone), days, ", ".join(gone))
    return gone
