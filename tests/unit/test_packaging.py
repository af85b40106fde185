"""What an installation gives: the wheel carries what the image build needs; imports stay cheap."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_agent_source_entry_point_and_types(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("pytest_microvm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        agent = zf.read("pytest_microvm/_guest/agent/agent.c")
        kernel_configs = {
            name: zf.read(f"pytest_microvm/_guest/kernel/{name}")
            for name in ("microvm.config", "microvm-x86_64.config", "microvm-aarch64.config")
        }
        (entry_points,) = (n for n in names if n.endswith("entry_points.txt"))
        entry_text = zf.read(entry_points).decode()
    assert agent == (REPO / "guest-image" / "agent" / "agent.c").read_bytes()
    for name, data in kernel_configs.items():
        assert data == (REPO / "guest-image" / "kernel" / name).read_bytes()
    assert "pytest_microvm/py.typed" in names
    assert "[pytest11]\nmicrovm = pytest_microvm.plugin" in entry_text
    assert "microvm = pytest_microvm.cli:main" in entry_text


def test_booting_does_not_import_paramiko() -> None:
    # paramiko takes a tenth of a second to import, paid before QEMU starts; only VMs
    # that use SSH should pay it. A subprocess: this test process imports it anyway.
    code = (
        "import sys, pytest_microvm.cli, pytest_microvm.channel.vhost_user.__main__; "
        "from pytest_microvm import MicroVM, VMConfig; "
        "print('paramiko' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
