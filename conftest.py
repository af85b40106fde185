"""Root conftest: pytester for plugin tests, and the split between unit and integration tests."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration and examples/ boots QEMU; mark it so `-m "not integration"` is the fast loop.
    for item in items:
        if "/tests/integration/" in str(item.path) or "/examples/" in str(item.path):
            item.add_marker(pytest.mark.integration)
