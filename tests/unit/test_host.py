"""Host detection against fake /dev, /proc and /sys trees: every reason is reachable."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_microvm.machine.host import detect_host


def fake_root(
    tmp_path: Path, *, kvm: bool = True, pvm: bool = False, flags: str = "fpu vmx sse", vsock: bool = False
) -> Path:
    (tmp_path / "dev").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys" / "module").mkdir(parents=True)
    if kvm:
        (tmp_path / "dev" / "kvm").touch()
    if vsock:
        (tmp_path / "dev" / "vhost-vsock").touch()
    if pvm:
        (tmp_path / "sys" / "module" / "kvm_pvm").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("kwargs", "usable", "reason"),
    [
        ({}, True, "usable"),
        ({"kvm": False}, False, "does not exist"),
        ({"pvm": True}, False, "kvm_pvm"),
        ({"flags": "fpu sse hypervisor"}, False, "vmx/svm"),
        ({"flags": "fpu svm"}, True, "usable"),
    ],
)
def test_kvm_detection(tmp_path: Path, kwargs: dict[str, object], usable: bool, reason: str) -> None:
    report = detect_host(fake_root(tmp_path, **kwargs))  # type: ignore[arg-type]
    assert report.kvm.usable is usable
    assert reason in report.kvm.reason
    assert report.accel == ("kvm" if usable else "tcg")


def test_vhost_vsock_detection(tmp_path: Path) -> None:
    assert not detect_host(fake_root(tmp_path / "a")).vhost_vsock.usable
    assert "modprobe vhost_vsock" in detect_host(fake_root(tmp_path / "b")).vhost_vsock.reason
    assert detect_host(fake_root(tmp_path / "c", vsock=True)).vhost_vsock.usable


def test_this_host(tmp_path: Path) -> None:
    # Whatever the machine, the report is consistent with its own facts.
    report = detect_host()
    assert report.kvm.usable == Path("/dev/kvm").exists() or not report.kvm.usable
    if Path("/sys/module/kvm_pvm").exists():
        assert report.accel == "tcg"
