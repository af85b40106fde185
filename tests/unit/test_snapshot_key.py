"""machine/snapshot/key.py: the key of a snapshot template (everything a saved guest
depends on, and nothing it does not), the host CPU's fingerprint in it under KVM
(``host_cpu``, through its ``cpuinfo``/``kernel_release`` parameters), and when a
configuration may be a clone (``why_not``), on either vsock path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pytest_microvm import VMConfig
from pytest_microvm.machine.config import Share
from pytest_microvm.machine.host import HostReport, choose
from pytest_microvm.machine.snapshot.key import host_cpu, template_key, why_not
from tests.snapshot_fakes import guest_image, host_report

# ---- template_key ------------------------------------------------------------------------


def test_template_key_is_stable_for_the_same_inputs(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    key = template_key(VMConfig(), image, host)
    assert key == template_key(VMConfig(), image, host)
    assert len(key) == 20 and int(key, 16) >= 0
    # What does not change the saved guest does not change the key.
    assert template_key(VMConfig(boot_timeout=5.0), image, host) == key


def test_template_key_changes_with_everything_a_snapshot_depends_on(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    share = tmp_path / "share"
    share.mkdir()
    base = VMConfig()
    key = template_key(base, image, host)
    variants = {
        "qemu_version": template_key(base, image, dataclasses.replace(host, qemu_version="8.0.0")),
        "accel": template_key(base, image, host_report(kvm=True), cpu="cpu-a"),
        "memory_mib": template_key(base.with_(memory_mib=512), image, host),
        "vcpus": template_key(base.with_(vcpus=2), image, host),
        "kernel_cmdline": template_key(base.with_(kernel_cmdline=("quiet",)), image, host),
        "qemu_args": template_key(base.with_(qemu_args=("-no-reboot",)), image, host),
        "shares": template_key(base.with_(shares={"/src": share}), image, host),
        "port": template_key(base.with_(port=5000), image, host),
        "image key": template_key(base, dataclasses.replace(image, key="otherimage"), host),
        "vsock": template_key(base.with_(vsock="kernel"), image, host_report(vhost_vsock=True)),
    }
    assert all(v != key for v in variants.values()), {k: v for k, v in variants.items() if v == key}
    assert len(set(variants.values())) == len(variants)  # and each differently


def test_template_key_of_the_two_vsock_paths_on_one_host_differs(tmp_path: Path) -> None:
    # Both paths have clones now: a template saved with one device must not load with the other.
    image, host = guest_image(tmp_path), host_report(kvm=True, vhost_vsock=True)
    assert choose(host, "auto", "auto").vsock == "kernel"
    kernel = template_key(VMConfig(), image, host, cpu="cpu-a")
    assert template_key(VMConfig(vsock="kernel"), image, host, cpu="cpu-a") == kernel  # auto picked it
    assert template_key(VMConfig(vsock="userspace"), image, host, cpu="cpu-a") != kernel


def test_template_key_changes_when_the_kernel_file_changes(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    key = template_key(VMConfig(), image, host)
    image.kernel.write_bytes(b"a rebuilt kernel, longer than the first one" * 100)  # size and mtime
    rebuilt = template_key(VMConfig(), image, host)
    assert rebuilt != key
    st = image.kernel.stat()
    os.utime(image.kernel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # mtime alone
    touched = template_key(VMConfig(), image, host)
    assert touched not in (key, rebuilt)


def test_template_key_counts_shares_and_ignores_where_they_come_from(tmp_path: Path) -> None:
    image, host = guest_image(tmp_path), host_report()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    base = VMConfig()
    key = template_key(base.with_(shares={"/src": one}), image, host)
    # Host path, mode and guest path live in QEMU's fsdev and the mount after the restore.
    assert template_key(base.with_(shares={"/src": two}), image, host) == key
    assert template_key(base.with_(shares={"/src": Share(one, readonly=True)}), image, host) == key
    assert template_key(base.with_(shares={"/elsewhere": two}), image, host) == key
    # How many is in the template (its devices): none, one and two are three templates.
    keys = {
        template_key(base, image, host),
        key,
        template_key(base.with_(shares={"/src": one, "/data": two}), image, host),
    }
    assert len(keys) == 3


def test_template_key_under_kvm_depends_on_the_host_cpu(tmp_path: Path) -> None:
    image = guest_image(tmp_path)

    def keys(host: HostReport, config: VMConfig) -> set[str]:
        return {template_key(config, image, host, cpu=cpu) for cpu in ("cpu-a", "cpu-b")}

    assert len(keys(host_report(kvm=True), VMConfig())) == 2  # -cpu host: another CPU, another template
    assert len(keys(host_report(), VMConfig())) == 1  # TCG: QEMU's own CPU model
    assert len(keys(host_report(kvm=True), VMConfig(accel="tcg"))) == 1  # TCG on a KVM host too


def test_template_key_under_kvm_takes_this_hosts_cpu_by_default(tmp_path: Path) -> None:
    image, kvm = guest_image(tmp_path), host_report(kvm=True)
    key = template_key(VMConfig(), image, kvm)
    assert key == template_key(VMConfig(), image, kvm, cpu=host_cpu())
    assert key != template_key(VMConfig(), image, kvm, cpu="another-cpu")


# ---- host_cpu -------------------------------------------------------------------------------


def _cpuinfo(*, mhz: str = "2400.000", flags: str = "fpu sse2 avx", second: str = "fpu sse2 avx") -> str:
    """Two processors' entries; ``second``: the flags of the second one."""
    entry = "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n"
    return entry.format(n=0, mhz=mhz, flags=flags) + "\n" + entry.format(n=1, mhz=mhz, flags=second)


def test_host_cpu_is_the_cpu_model_flags_and_kernel_but_not_the_clock(tmp_path: Path) -> None:
    real = host_cpu()
    assert real == host_cpu() and len(real) == 16 and int(real, 16) >= 0
    cpuinfo = tmp_path / "cpuinfo"

    def fingerprint(text: str | None, release: str = "6.1.0-1-amd64") -> str:
        if text is None:
            cpuinfo.unlink(missing_ok=True)
        else:
            cpuinfo.write_text(text)
        return host_cpu(cpuinfo, kernel_release=release)

    base = fingerprint(_cpuinfo())
    assert len(base) == 16 and base != real
    assert fingerprint(_cpuinfo(mhz="800.123")) == base  # the frequency changes by the second
    assert fingerprint(_cpuinfo(second="fpu")) == base  # only the first processor's entry
    assert fingerprint(_cpuinfo(flags="fpu sse2")) != base  # a CPU without AVX
    assert fingerprint(_cpuinfo(), release="6.12.0-1-amd64") != base  # KVM's view: the host kernel
    unreadable = fingerprint(None)  # no /proc/cpuinfo: the kernel alone, no error
    assert len(unreadable) == 16 and unreadable != base
    assert host_cpu(tmp_path, kernel_release="6.1.0-1-amd64") == unreadable  # unreadable (a directory): the same


def test_host_cpu_takes_the_running_kernels_release_by_default(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_cpuinfo())
    mine = host_cpu(cpuinfo)
    assert mine == host_cpu(cpuinfo, kernel_release=os.uname().release)
    assert mine != host_cpu(cpuinfo, kernel_release=os.uname().release + "-other")


# ---- why_not ---------------------------------------------------------------------------------


def test_why_not_allows_a_plain_config_on_either_vsock_path() -> None:
    assert why_not(VMConfig(), host_report()) is None
    assert why_not(VMConfig(), host_report(kvm=True)) is None  # KVM without vhost-vsock: userspace
    # Forcing userspace on a host that has kernel vhost-vsock allows cloning too.
    assert why_not(VMConfig(vsock="userspace"), host_report(kvm=True, vhost_vsock=True)) is None
    # And the kernel vhost-vsock path has clones of its own: forced, or picked by auto under KVM.
    kernel_host = host_report(kvm=True, vhost_vsock=True)
    assert choose(kernel_host, "kvm", "auto").vsock == "kernel"
    assert why_not(VMConfig(vsock="kernel"), kernel_host) is None
    assert why_not(VMConfig(accel="kvm"), kernel_host) is None
    assert why_not(VMConfig(), kernel_host) is None


@pytest.mark.parametrize(
    ("config", "host", "hooked", "cause"),
    [
        (VMConfig(snapshot=False), host_report(), False, "snapshot=False"),
        (VMConfig(keep=True), host_report(), False, "kept"),
        (VMConfig(network=True), host_report(), False, "network=True"),
        (VMConfig(), host_report(), True, "pytest_microvm_qemu_args hook"),
        (VMConfig(rootfs="host"), host_report(), False, "9p"),
        (VMConfig(), host_report(qemu=None), False, "QEMU is not installed"),
        # The same causes on the kernel vhost-vsock path.
        (VMConfig(snapshot=False, vsock="kernel"), host_report(kvm=True, vhost_vsock=True), False, "snapshot=False"),
        (VMConfig(), host_report(kvm=True, vhost_vsock=True), True, "pytest_microvm_qemu_args hook"),
    ],
)
def test_why_not_names_the_cause(config: VMConfig, host: HostReport, hooked: bool, cause: str) -> None:
    reason = why_not(config, host, hooked=hooked)
    assert reason is not None and cause in reason


def test_why_not_refuses_the_host_root_because_9p_does_not_migrate() -> None:
    reason = why_not(VMConfig(rootfs="host"), host_report())
    assert reason is not None and "9p" in reason and "migrate" in reason
    # Any other root is fine: only the host's / is a share mounted from the first moment.
    assert why_not(VMConfig(rootfs="debian"), host_report()) is None
