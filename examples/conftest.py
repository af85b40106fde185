"""An example suite, as a user of pytest-microvm would write it.

Run it with `pytest examples/`. The plugin is loaded by its entry point, so there is
nothing to import here: only fixtures that shape the VM for this suite.
"""

import pytest

from pytest_microvm import VMConfig


@pytest.fixture
def microvm_config(microvm_config: VMConfig) -> VMConfig:
    # Every VM of this suite gets a little more memory than the default.
    return microvm_config.with_(memory_mib=320)
