"""Snapshot templates and clones: a fresh VM for the price of a restore, not a boot.

A template is a guest booted once per configuration, probed, quieted and saved; a clone
is a fresh QEMU that loads it and takes an identity of its own. The package, by job:

- :mod:`.key`: whether a configuration can be a clone here, and its template's key
- :mod:`.store`: templates in the cache: made once, checked, discarded, forgotten
- :mod:`.ram`: a clone's RAM, a copy (userspace vsock) or copy-on-write (kernel vsock)
- :mod:`.strategies`: the launch strategies that save a template and restore a clone
- :mod:`.policy`: clone-else-boot (:class:`Templates`)
- :mod:`.errors`: what goes wrong, each error leading to a different answer

The pool of clones made ahead is :mod:`pytest_microvm.machine.pool`. Names are imported
on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CannotClone": "errors",
    "ShmTooSmall": "errors",
    "SnapshotError": "errors",
    "TemplateBroken": "errors",
    "template_key": "key",
    "why_not": "key",
    "Template": "store",
    "make_template": "store",
    "RestoreClone": "strategies",
    "SaveTemplate": "strategies",
    "Templates": "policy",
}
__all__ = [
    "CannotClone",
    "RestoreClone",
    "SaveTemplate",
    "ShmTooSmall",
    "SnapshotError",
    "Template",
    "TemplateBroken",
    "Templates",
    "make_template",
    "template_key",
    "why_not",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_microvm.machine.snapshot' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_microvm.machine.snapshot.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from pytest_microvm.machine.snapshot.errors import CannotClone, ShmTooSmall, SnapshotError, TemplateBroken
    from pytest_microvm.machine.snapshot.key import template_key, why_not
    from pytest_microvm.machine.snapshot.policy import Templates
    from pytest_microvm.machine.snapshot.store import Template, make_template
    from pytest_microvm.machine.snapshot.strategies import RestoreClone, SaveTemplate
