"""The CI recipe users copy stays what the repository keeps and lints: the README's block is
.github/workflows/vm-tests.yml, it installs every system package a user needs, and the
project's own workflow runs the README's two commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
RECIPE = ROOT / ".github" / "workflows" / "vm-tests.yml"
CI = ROOT / ".github" / "workflows" / "ci.yml"
# In scripts/bootstrap for this repository's own tests and CI stages, not for a user's suite:
# the aarch64 guests' QEMU and cross toolchain (arch="aarch64" is opt-in), the SSH client the
# xdist-ssh-gateway test drives, and shellcheck for the lint env.
DEV_ONLY = {"qemu-system-arm", "gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user-static", "openssh-client",
            "shellcheck"}  # fmt: skip


def _bootstrap_packages() -> set[str]:
    text = (ROOT / "scripts" / "bootstrap").read_text()
    block = re.search(r"APT_PACKAGES=\((.*?)\n\)", text, re.S)
    assert block is not None
    return {word for line in block.group(1).splitlines() for word in line.split("#")[0].split()}


def test_the_readme_shows_the_recipe_file_as_it_is() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    assert RECIPE.read_text() in blocks


def test_the_recipe_installs_every_package_a_user_needs() -> None:
    text = RECIPE.read_text().replace("\\\n", " ")
    install = re.search(r"apt-get install -y --no-install-recommends ([^\n]+)", text)
    assert install is not None
    named = set(shlex.split(install.group(1)))
    needed = _bootstrap_packages() - DEV_ONLY
    assert needed <= named, f"the recipe lacks {sorted(needed - named)}"
    assert "erofs-utils" in named and "qemu-system-x86" in named
    # Not from PyPI (it is not published there), and never a bare pip install (PEP 668).
    assert "pip install 'pytest-microvm" not in text and "python3 -m venv .venv" in text


def test_the_projects_workflow_runs_the_readmes_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first is not None
    commands = [line for line in first.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    workflow = CI.read_text()
    for command in commands:
        assert f"run: {command}\n" in workflow, command
