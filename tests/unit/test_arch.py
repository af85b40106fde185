"""Guest architectures (pytest_microvm/arch.py): names, QEMU command lines as each host
would build them (an arm64 host with KVM is simulated: none is at hand), KVM only for the
host's own architecture, kernels, apt, and the clear errors for what cannot work."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import pytest

from pytest_microvm import ConfigError, ImageError, VMConfig, build_image
from pytest_microvm import arch as arches
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.sources import elf_interpreter, elf_needed, library_closure
from pytest_microvm.machine import storage
from pytest_microvm.machine.host import detect_host
from pytest_microvm.machine.qemu import qemu_argv
from pytest_microvm.machine.snapshot.key import template_key
from pytest_microvm.machine.snapshot.strategies import snapshot_devices
from pytest_microvm.options import BY_NAME, OptionError, image_request, vm_config
from tests.snapshot_fakes import guest_image, host_report
from tests.unit.test_host import fake_root

ARM64_IMAGE = b"\0" * 0x38 + b"ARM\x64" + b"\0" * 64  # the Image header's magic at 0x38


@pytest.fixture
def arm64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process believes it runs on an arm64 host."""
    monkeypatch.setattr(arches, "host_name", lambda: "aarch64")


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(("name", "canonical"), [("aarch64", "aarch64"), ("arm64", "aarch64"), ("amd64", "x86_64")])
def test_names_and_debians_names(name: str, canonical: str) -> None:
    assert arches.get(name).name == canonical
    assert VMConfig(arch=name).arch == canonical


def test_default_is_the_hosts_own() -> None:
    assert arches.get().native and VMConfig().arch == arches.host_name()


@pytest.mark.parametrize("name", ["sparc64", "riscv64", "arm"])
def test_unsupported_arch_lists_the_supported_and_their_packages(name: str) -> None:
    with pytest.raises(ConfigError, match=r"not supported; .*x86_64 \(qemu-system-x86\), aarch64 \(qemu-system-arm\)"):
        VMConfig(arch=name)


def test_aarch64_command_line_under_kvm_on_an_arm64_host(arm64_host: None, tmp_path: Path) -> None:
    image = dataclasses.replace(guest_image(tmp_path), arch="aarch64", pvh=False)
    argv = qemu_argv(image, qemu="qemu-system-aarch64", accel="kvm", console=tmp_path / "c", shared_memory=True)
    assert _option(argv, "-machine") == "virt,accel=kvm,gic-version=host,memory-backend=mem"
    assert _option(argv, "-cpu") == "host"
    assert _option(argv, "-append").startswith("console=ttyAMA0 panic=-1")
    assert _option(argv, "-kernel") == str(image.kernel)


def test_aarch64_command_line_under_tcg(tmp_path: Path) -> None:
    image = dataclasses.replace(guest_image(tmp_path), arch="aarch64", pvh=False)
    argv = qemu_argv(image, qemu="qemu-system-aarch64", accel="tcg", console=tmp_path / "c")
    assert _option(argv, "-machine") == "virt,accel=tcg,gic-version=3"
    assert _option(argv, "-cpu") == "cortex-a57"  # 1.45 s to init, against 5.9 s with -cpu max


def test_x86_64_command_line_is_q35(tmp_path: Path) -> None:
    argv = qemu_argv(guest_image(tmp_path), qemu="q", accel="tcg", console=tmp_path / "c")
    assert _option(argv, "-machine") == "q35,accel=tcg" and "-cpu" not in argv
    assert _option(argv, "-append").startswith("console=ttyS0 ")


def test_kvm_on_an_arm64_host_needs_no_x86_cpu_flag(arm64_host: None, tmp_path: Path) -> None:
    report = detect_host(fake_root(tmp_path, flags="fp asimd evtstrm"))
    assert report.arch == "aarch64" and report.kvm.usable
    foreign = report.for_arch("x86_64")
    assert not foreign.kvm.usable and "KVM runs only aarch64 guests" in foreign.kvm.reason
    assert foreign.for_arch("aarch64").kvm.usable  # back to its own: KVM again


def test_kvm_is_for_the_hosts_own_architecture_only(tmp_path: Path) -> None:
    report = detect_host(fake_root(tmp_path))
    assert report.kvm.usable
    other = next(a for a in arches.NAMES if a != arches.host_name())
    foreign = report.for_arch(other)
    assert foreign.accel == "tcg" and foreign.arch == other
    assert foreign.qemu == shutil.which(arches.get(other).qemu_binary)
    assert arches.get(other).qemu_package in foreign.missing_qemu()


def test_clones_of_aarch64_have_no_vmgenid() -> None:
    assert snapshot_devices("g", "aarch64") == ["-device", "pcie-root-port,id=microvm-hotplug,bus=pcie.0,chassis=1"]
    assert "vmgenid,id=microvm-vmgenid,guid=g" in snapshot_devices("g", "x86_64")


def test_template_keys_differ_by_architecture(tmp_path: Path) -> None:
    image = guest_image(tmp_path)
    host = host_report()
    keys = {
        a: template_key(VMConfig(image=dataclasses.replace(image, arch=a), arch=a), image, host) for a in arches.NAMES
    }
    assert len(set(keys.values())) == len(arches.NAMES)


def test_arm64_kernel_image_plain_and_gzipped() -> None:
    aarch64 = arches.get("aarch64")
    assert aarch64.boot_kernel(ARM64_IMAGE, print) == ("Image", ARM64_IMAGE, False)
    assert aarch64.boot_kernel(gzip.compress(ARM64_IMAGE), lambda _m: None)[1] == ARM64_IMAGE
    with pytest.raises(ImageError, match="not an arm64 kernel Image"):
        aarch64.boot_kernel(b"MZ" + b"\0" * 200, lambda _m: None)


def test_another_architectures_apt_has_lists_of_its_own(tmp_path: Path) -> None:
    other = arches.get(next(a for a in arches.NAMES if a != arches.host_name()))
    apt = Apt(other, tmp_path)
    opts = apt.options()
    assert (
        f"APT::Architecture={other.debian}" in opts and f"Dir::State::Lists={tmp_path}/apt/{other.debian}/lists" in opts
    )
    assert apt.memo == tmp_path / "apt" / other.debian
    assert Apt(arches.get(), tmp_path).options() == []  # the host's own: its apt as it is


def test_foreign_rootfs_host_is_a_clear_error(tmp_path: Path) -> None:
    other = next(a for a in arches.NAMES if a != arches.host_name())
    with pytest.raises(ImageError, match=r"rootfs='host' is the host's own .* userland, which a .* guest cannot run"):
        build_image(arch=other, rootfs="host", cache=tmp_path)


def test_an_image_of_another_architecture_is_refused(tmp_path: Path) -> None:
    image = dataclasses.replace(guest_image(tmp_path), arch="aarch64")
    with pytest.raises(ConfigError, match="is for aarch64 guests, and the VM is asked to be x86_64"):
        storage.image_for(VMConfig(image=image, arch="x86_64"))


def test_option_table_has_arch() -> None:
    option = BY_NAME["arch"]
    assert option.convert("aarch64") == "aarch64" and option.convert(None) is None
    with pytest.raises(OptionError, match="x86_64 or aarch64"):
        option.convert("mips")
    assert vm_config({"arch": "aarch64"}).arch == "aarch64"
    assert vm_config({}).arch == arches.host_name()
    assert image_request({"arch": "aarch64"}, None)["arch"] == "aarch64"


def test_needed_libraries_are_read_from_the_elf_file() -> None:
    ls = Path(shutil.which("ls") or "/bin/ls").resolve()
    assert "libc.so.6" in elf_needed(ls)
    interp = elf_interpreter(ls)
    assert interp is not None
    closure = library_closure(Path("/"), [str(ls)])
    assert interp in closure and any(g.endswith("/libc.so.6") for g in closure)


def test_a_library_no_package_brings_is_named(tmp_path: Path) -> None:
    ls = Path(shutil.which("ls") or "/bin/ls").resolve()
    (tmp_path / "bin").mkdir()
    shutil.copy(ls, tmp_path / "bin" / "ls")
    with pytest.raises(ImageError, match=r"ls needs .*, which none of its packages brings|is not in the packages"):
        library_closure(tmp_path, ["/bin/ls"])
