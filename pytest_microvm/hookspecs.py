"""Hook specifications of pytest-microvm (added in ``pytest_addhooks``).

Implement them in a conftest.py or plugin; names carry the ``pytest_microvm_`` prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_microvm.machine.config import VMConfig
    from pytest_microvm.machine.vm import MicroVM


@pytest.hookspec(firstresult=True)
def pytest_microvm_config(config: VMConfig, request: pytest.FixtureRequest) -> VMConfig | None:
    """Adjust the configuration of a VM about to boot for ``request``'s test.

    Return a new :class:`VMConfig` (``config.with_(...)``) or None to keep it. The first
    implementation returning a value wins. Runs after options, ini keys and the
    ``microvm`` marker were applied.
    """


@pytest.hookspec(firstresult=True)
def pytest_microvm_qemu_args(config: VMConfig, argv: list[str]) -> list[str] | None:
    """Return the QEMU argument list to use instead of ``argv`` (e.g. to add a device).

    ``argv[0]`` is the QEMU binary; no shell is involved. The first implementation
    returning a list wins; return None to leave the arguments alone.
    """


@pytest.hookspec
def pytest_microvm_ready(vm: MicroVM) -> None:
    """Called once a VM passed its readiness probe, before the test gets it."""
