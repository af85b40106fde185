"""The kernel-from-source recipe without compiling a kernel: config checks and tool checks.

The build itself runs in the integration suite (tests/integration/test_source_kernel.py),
where the kernel it makes is booted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_microvm import ImageError, build_image
from pytest_microvm.image import kernel_build
from pytest_microvm.image.kernel_build import check_build_tools, kernel_config_path, missing_options, wanted_options


def test_the_shipped_fragment_asks_for_what_the_guest_needs() -> None:
    wanted = wanted_options(kernel_config_path().read_text())
    for option in ("CONFIG_PVH", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_VIRTIO_PCI", "CONFIG_BLK_DEV_INITRD",
                   "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_UNIX98_PTYS", "CONFIG_VIRTIO_NET", "CONFIG_INET"):  # fmt: skip
        assert wanted.get(option) == "y", option


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
