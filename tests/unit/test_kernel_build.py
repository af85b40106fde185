"""The kernel-from-source recipe without compiling a kernel: config checks and tool checks.

The build itself runs in the integration suite (tests/integration/test_source_kernel.py),
where the kernel it makes is booted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_microvm import ImageError, build_image
from pytest_microvm import arch as arches
from pytest_microvm.image import kernel_build
from pytest_microvm.image.kernel_build import (
    check_build_tools,
    kernel_config_path,
    kernel_fragments,
    missing_options,
    wanted_options,
)
from tests.agent_harness import processes_mentioning
from tests.signals import defaults


@pytest.mark.parametrize(
    ("arch", "own"),
    [
        ("x86_64", ("CONFIG_PVH", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_HOTPLUG_PCI_ACPI", "CONFIG_VMGENID")),
        ("aarch64", ("CONFIG_PCI_HOST_GENERIC", "CONFIG_SERIAL_AMBA_PL011_CONSOLE", "CONFIG_RTC_DRV_PL031")),
    ],
)
def test_the_shipped_fragments_ask_for_what_the_guest_needs(arch: str, own: tuple[str, ...]) -> None:
    fragments = kernel_fragments(arches.get(arch))
    assert fragments[0] == kernel_config_path() and fragments[1].name == f"microvm-{arch}.config"
    wanted = wanted_options("".join(p.read_text() for p in fragments))
    common = ("CONFIG_VIRTIO_VSOCKETS", "CONFIG_VIRTIO_PCI", "CONFIG_BLK_DEV_INITRD", "CONFIG_HOTPLUG_PCI_PCIE",
              "CONFIG_UNIX98_PTYS", "CONFIG_VIRTIO_NET", "CONFIG_INET")  # fmt: skip
    for option in (*common, *own):
        assert wanted.get(option) == "y", option


def test_a_cross_build_names_its_compiler() -> None:
    other = arches.get(next(a for a in arches.NAMES if a != arches.host_name()))
    assert other.make_args() == [f"ARCH={other.linux_arch}", f"CROSS_COMPILE={other.cross_compilers[0][:-3]}"]
    assert arches.get().make_args() == []


def test_fragment_lines_parse_as_set_and_unset() -> None:
    text = '# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\n\nCONFIG_D=m\n'
    assert wanted_options(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"', "CONFIG_D": "m"}


def test_options_kconfig_dropped_are_reported() -> None:
    wanted = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_D": "n"}
    final = "CONFIG_A=y\n# CONFIG_C is not set\nCONFIG_D=y\n"
    # B is absent, which counts as not set: as asked. C was dropped, D forced on.
    assert missing_options(wanted, final) == ["CONFIG_C", "CONFIG_D"]


def test_missing_build_tools_are_named_with_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(kernel_build.shutil, "which", lambda t: None if t in ("flex", "bison") else real_which(t))
    with pytest.raises(ImageError, match=r"needs flex, bison.*apt-get install flex bison"):
        check_build_tools()


def test_source_kernel_takes_no_module_tree(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="built in"):
        build_image(kernel="source", modules=str(tmp_path), cache=tmp_path / "cache")


def test_ctrl_c_during_make_stops_the_compilers_too(tmp_path: Path) -> None:
    # make's children (the compilers) must not outlive an interrupted build.
    marker = f"31.{os.getpid()}"  # its own: another run of this suite may be sleeping too
    (tmp_path / "Makefile").write_text(f"all:\n\tsleep {marker} & sleep {marker}; wait\n")
    code = (
        "import sys; from pathlib import Path; from pytest_microvm.image.kernel_build import _make; "
        f"_make(Path({str(tmp_path)!r}), ['all'], 'test', print, Path({str(tmp_path / 'log')!r}))"
    )
    # Ctrl-C is a SIGINT at its default action, even when the suite itself ignores it.
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=defaults()
    )
    try:
        deadline = time.monotonic() + 30
        while len(_sleepers(marker)) < 2:
            assert time.monotonic() < deadline, "make never started its children"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) != 0
        deadline = time.monotonic() + 10
        while _sleepers(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sleepers(marker) == []
    finally:
        proc.kill()
        proc.wait()  # reaped here: a Popen left running warns in whichever test comes next
        for pid in _sleepers(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_failing_make_names_its_log(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n\t@echo the-compiler-said-no; false\n")
    with pytest.raises(ImageError, match=r"(?s)exit 2\); the log is .*build.log.*the-compiler-said-no"):
        kernel_build._make(tmp_path, ["all"], "test", lambda _m: None, tmp_path / "build.log")


def _sleepers(marker: str) -> list[int]:
    # Only the sleeps themselves, not the shell whose command line also names them.
    return [pid for pid, cmdline in processes_mentioning(marker).items() if cmdline == f"sleep {marker}"]
