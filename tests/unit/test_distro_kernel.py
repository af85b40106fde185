"""The default kernel on an Ubuntu host (image/sources.py's KernelSource): apt answered from a
recorded layout (tests/data/ubuntu-noble), the .debs built here with dpkg-deb."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microvm import arch as arches
from pytest_microvm.errors import ImageError
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.sources import _offered, debian_kernel, default_kernel_source, describe_kernel

LAYOUT = Path(__file__).parents[1] / "data" / "ubuntu-noble" / "layout.json"

# apt-cache and apt-get as far as the builder asks them: answers from the layout (JSON in
# $FAKE_APT_LAYOUT); `download` builds the .deb from $FAKE_APT_FILES/<package>/.
FAKE_APT = r"""
import json, os, subprocess, sys
layout = json.load(open(os.environ["FAKE_APT_LAYOUT"]))
args = [a for a in sys.argv[1:] if not a.startswith("-o") and a != "--no-all-versions"]
args = [a for i, a in enumerate(args) if not (i > 0 and sys.argv[1:][i - 1] == "-o")]
cmd, name = args[0], (args[1] if len(args) > 1 else "")
pkg = layout["packages"].get(name)
if cmd in ("show", "depends", "download") and pkg is None:
    sys.stderr.write(f"E: No packages found for {name}\n")
    sys.exit(100)
if cmd == "show":
    print(f"Package: {name}\nVersion: {pkg['version']}\n")
elif cmd == "depends":
    print(name)
    for dep in pkg["depends"]:
        print(f"  Depends: {dep}")
elif cmd == "download":
    tree = os.path.join(os.environ["FAKE_APT_FILES"], name)
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", tree, f"{name}_{pkg['version']}_amd64.deb"], check=True,
                   capture_output=True)
    with open(os.environ["FAKE_APT_LOG"], "a") as log:
        log.write(name + "\n")
else:
    sys.exit(f"fake apt: {cmd} not recorded")
"""


def _module(path: Path, depends: str, work: Path) -> None:
    """A stand-in kernel module: an ELF object with the .modinfo depends= the real one has."""
    src = work / "m.c"
    src.write_text(f'const char modinfo[] __attribute__((section(".modinfo"), used)) = "depends={depends}";\n')
    ko = path.with_suffix("")  # x.ko.zst -> x.ko
    subprocess.run(["cc", "-c", "-o", str(ko), str(src)], check=True)
    subprocess.run(["zstd", "-q", "--rm", "-f", str(ko), "-o", str(path)], check=True)


@pytest.fixture
def ubuntu_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH with apt-cache/apt-get answering as an Ubuntu 24.04 host's; returns the download log."""
    if not (shutil.which("dpkg-deb") and shutil.which("zstd") and shutil.which("cc")):
        pytest.fail("needs dpkg-deb, zstd and cc (scripts/bootstrap installs them)")
    layout = json.loads(LAYOUT.read_text())
    files = tmp_path / "files"
    for name, pkg in layout["packages"].items():
        tree = files / name
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {pkg['version']}\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: t\n"
        )
        for rel, kind in (pkg.get("files") or {}).items():
            path = tree / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind.startswith("module:"):
                _module(path, kind.removeprefix("module:"), tmp_path)
            elif kind == "builtin":
                path.write_text("\n".join(layout["builtin"]) + "\n")
            else:
                path.write_bytes(b"MZ stand-in for " + rel.encode())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-cache", "apt-get"):
        (bin_dir / tool).write_text(f"#!{sys.executable}\n{FAKE_APT}")
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "downloads"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APT_LAYOUT", str(LAYOUT))
    monkeypatch.setenv("FAKE_APT_FILES", str(files))
    monkeypatch.setenv("FAKE_APT_LOG", str(log))
    return log


def test_an_ubuntu_host_gets_linux_image_virtual_with_its_module_packages(ubuntu_host: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    apt = Apt(arches.get("x86_64"), cache)
    source = default_kernel_source(cache, apt)
    assert (source.name, source.meta) == ("Ubuntu", "linux-image-virtual")
    kernel = debian_kernel(cache, lambda m: None, apt)
    assert kernel.release == "6.8.0-31-generic"
    assert kernel.image.read_bytes().startswith(b"MZ stand-in for boot/vmlinuz-6.8.0-31-generic")
    assert ubuntu_host.read_text().split() == [
        "linux-image-6.8.0-31-generic", "linux-modules-6.8.0-31-generic", "linux-modules-extra-6.8.0-31-generic",
    ]  # fmt: skip
    # From linux-modules, zstd undone, dependencies first; the virtio transports are built in.
    assert [m.name for m in kernel.modules] == [
        "vsock.ko", "vmw_vsock_virtio_transport_common.ko", "vmw_vsock_virtio_transport.ko",
        "failover.ko", "net_failover.ko", "virtio_net.ko",
    ]  # fmt: skip
    assert all(m.read_bytes().startswith(b"\x7fELF") for m in kernel.modules)
    groups = {g: [m.name for m in mods] for g, mods in kernel.groups.items()}
    assert groups["9p"] == ["9pnet.ko", "9pnet_virtio.ko", "netfs.ko", "9p.ko"]
    assert groups["blk"] == ["erofs.ko"]  # the one module the guest loads that is in linux-modules-extra
    assert groups["overlay"] == ["overlay.ko"]
    assert groups["vhost"] == ["vhost_iotlb.ko", "vhost.ko", "vhost_vsock.ko"]
    # The header and `microvm doctor` say which distribution's kernel it is.
    assert describe_kernel(None, cache, arches.get("x86_64")) == (
        "6.8.0-31-generic (Ubuntu linux-image-6.8.0-31-generic 6.8.0-31.31)"
    )


def test_a_host_that_offers_neither_kernel_says_so_and_what_to_do(
    ubuntu_host: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = json.loads(LAYOUT.read_text())
    del layout["packages"]["linux-image-virtual"]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(layout))
    monkeypatch.setenv("FAKE_APT_LAYOUT", str(empty))
    cache = tmp_path / "cache"
    with pytest.raises(ImageError) as info:
        debian_kernel(cache, lambda m: None, Apt(arches.get("x86_64"), cache))
    message = str(info.value)
    assert "neither Debian's linux-image-amd64 nor Ubuntu's linux-image-virtual" in message
    assert "apt-get update" in message and "--kernel source" in message
    assert describe_kernel(None, cache, arches.get("x86_64")).startswith("unknown (the host's apt sources offer")


def test_a_debian_host_keeps_debians_kernel(tmp_path: Path) -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("needs apt (a Debian or Ubuntu host)")
    cache = tmp_path / "cache"
    apt = Apt(arches.get(), cache)
    if not apt.has_lists():
        pytest.skip("needs the host's apt package lists (apt-get update)")
    if not _offered(apt.arch.kernel_package, apt):
        pytest.skip(f"the host's apt offers no {apt.arch.kernel_package}: not a Debian host")
    source = default_kernel_source(cache, apt)
    assert (source.name, source.meta) == ("Debian", apt.arch.kernel_package)  # first in the order
