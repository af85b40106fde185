"""The errors of snapshot templates and clones: each leads the caller to a different answer."""

from __future__ import annotations

from pytest_microvm.errors import BootError


class SnapshotError(BootError):
    """A template could not be made, or a clone could not be restored from it: the caller
    tries once more, then boots."""


class TemplateBroken(SnapshotError):
    """The template's files are incomplete or its saved state did not load: it is
    discarded and made again."""


class CannotClone(SnapshotError):
    """This host cannot hold a clone (the tmpfs for its RAM); the template is fine: boot."""


class ShmTooSmall(CannotClone):
    """The tmpfs for clones' RAM has less room than one clone's memory."""


class MigrationFailed(SnapshotError):
    """QEMU ended a migration with status failed: the stream itself was refused."""


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
