"""Host choice, VMConfig validation and CID/port allocation: the logic, without a VM."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import ClassVar

import pytest

from pytest_microvm import ConfigError, VMConfig
from pytest_microvm.channel import kernel
from pytest_microvm.channel.allocation import claim, claim_random
from pytest_microvm.channel.base import bind_free
from pytest_microvm.channel.userspace import UserspaceVsock
from pytest_microvm.errors import MicroVMError
from pytest_microvm.machine.host import Capability, HostReport, choose

YES, NO = Capability(True, "usable"), Capability(False, "missing")


def host(kvm: bool, vsock: bool) -> HostReport:
    return HostReport(kvm=YES if kvm else NO, vhost_vsock=YES if vsock else NO, qemu="/q", qemu_version="7.2")


@pytest.mark.parametrize(
    ("kvm", "vsock", "want"),
    [
        (True, True, ("kvm", "kernel")),
        (True, False, ("kvm", "userspace")),
        (False, True, ("tcg", "kernel")),  # its clones are faster and smaller under TCG too
        (False, False, ("tcg", "userspace")),
    ],
)
def test_auto_choice(kvm: bool, vsock: bool, want: tuple[str, str]) -> None:
    c = choose(host(kvm, vsock))
    assert (c.accel, c.vsock) == want
    assert f"accel={want[0]}" in c.why and f"vsock={want[1]}" in c.why


def test_forcing_what_the_host_cannot_do_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="accel=kvm was forced, but missing"):
        choose(host(False, False), accel="kvm")
    with pytest.raises(ConfigError, match="vsock=kernel was forced, but missing"):
        choose(host(True, False), vsock="kernel")
    with pytest.raises(ConfigError, match="accel must be one of"):
        choose(host(True, True), accel="xen")
    c = choose(host(True, True), accel="tcg", vsock="userspace")  # forcing the slower path is fine
    assert (c.accel, c.vsock) == ("tcg", "userspace")


def test_the_choice_says_why_it_took_the_path_it_took() -> None:
    for kvm in (True, False):
        assert "no backend process per VM, and copy-on-write snapshot clones" in choose(host(kvm, True)).why
    assert "vsock=userspace (missing)" in choose(host(True, False)).why
    assert "vsock=kernel (asked for; usable)" in choose(host(False, True), vsock="kernel").why


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"memory_mib": 32}, "at least 64"), ({"vcpus": 0}, "between 1 and 64"), ({"boot_timeout": 0}, "positive")],
)
def test_vmconfig_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VMConfig(**kwargs)  # type: ignore[arg-type]
    assert VMConfig().with_(memory_mib=512).memory_mib == 512


def test_claims_are_exclusive_until_released(tmp_path: Path) -> None:
    first = claim("cid", 42, tmp_path)
    assert first is not None
    assert claim("cid", 42, tmp_path) is None  # another VM of ours holds it
    first.release()
    again = claim("cid", 42, tmp_path)
    assert again is not None
    again.release()


def test_random_claim_skips_taken_values(tmp_path: Path) -> None:
    held = [claim("cid", v, tmp_path) for v in range(3, 10)]
    got = claim_random("cid", 3, 10, rng=random.Random(1), directory=tmp_path)
    assert got.value == 10
    got.release()
    for h in held:
        assert h is not None
        h.release()
    with pytest.raises(OSError, match="no free cid"):
        blocker = claim("cid", 5, tmp_path)
        try:
            claim_random("cid", 5, 5, directory=tmp_path, attempts=4)
        finally:
            assert blocker is not None
            blocker.release()


def test_a_taken_port_is_traded_for_a_free_one() -> None:
    tried: list[int] = []
    taken = {1024, 2000}

    def bind(port: int) -> int:
        tried.append(port)
        if port in taken:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return port

    picks = iter([2000, 3000])
    assert bind_free(bind, 1024, pick=lambda: next(picks)) == 3000 and tried == [1024, 2000, 3000]


def test_no_port_asked_means_any_free_one() -> None:
    assert bind_free(lambda port: port, None, pick=lambda: 4321) == 4321


def test_binding_does_not_retry_other_errors() -> None:
    def bind(port: int) -> int:
        raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")  # no host vsock at all

    with pytest.raises(OSError) as info:
        bind_free(bind, 1024)
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_a_host_with_every_port_taken_says_so() -> None:
    def bind(port: int) -> int:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    with pytest.raises(MicroVMError, match="no free host vsock port"):
        bind_free(bind, 1024)


def test_userspace_listen_moves_off_a_port_already_listened_on(tmp_path: Path) -> None:
    vsock = UserspaceVsock(tmp_path)  # not started: listening needs only the socket directory
    with vsock.listen(5000) as first, vsock.listen(5000) as second, vsock.listen() as third:
        assert first.port == 5000 and second.port not in (5000, 0) and third.port not in (0, second.port)
        assert (tmp_path / f"vsock_{second.port}").exists()


def test_the_boot_timeout_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICROVM_BOOT_TIMEOUT", raising=False)
    assert VMConfig().boot_timeout == 120.0
    monkeypatch.setenv("MICROVM_BOOT_TIMEOUT", "900")  # a slow host: scripts/nested's L2 guests
    assert VMConfig().boot_timeout == 900.0 and VMConfig(boot_timeout=5).boot_timeout == 5
    monkeypatch.setenv("MICROVM_BOOT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="MICROVM_BOOT_TIMEOUT='soon': not a number"):
        VMConfig()


class _FakeKernelListener:
    """KernelVsockListener without AF_VSOCK (this host cannot bind CID 2): ports in ``taken``
    are held by another program."""

    taken: ClassVar[set[int]] = set()
    made: ClassVar[list[_FakeKernelListener]] = []

    def __init__(self, guest_cid: int, port: int) -> None:
        if port in self.taken:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.guest_cid, self.port, self.closed = guest_cid, port, False
        self.made.append(self)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_kernel_listeners(monkeypatch: pytest.MonkeyPatch) -> type[_FakeKernelListener]:
    class Fake(_FakeKernelListener):
        taken: ClassVar[set[int]] = set()
        made: ClassVar[list[_FakeKernelListener]] = []

    monkeypatch.setattr(kernel, "KernelVsockListener", Fake)
    return Fake


def _free(cid: int) -> bool:
    """No process of ours holds ``cid`` (claimed and given back at once)."""
    held = claim("cid", cid)
    if held is not None:
        held.release()
    return held is not None


def _scripted(monkeypatch: pytest.MonkeyPatch, *cids: int) -> None:
    drawn = iter(cids)

    class Scripted(random.Random):
        def randint(self, a: int, b: int) -> int:
            value = next(drawn)
            assert a <= value <= b and a > 1024, (a, value, b)  # ports below 1025 need privileges
            return value

    monkeypatch.setattr(kernel, "_rng", Scripted())


def test_the_kernel_channel_claims_a_cid_whose_port_is_free_and_the_agent_connects_there(
    fake_kernel_listeners: type[_FakeKernelListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_kernel_listeners.taken = {70001}  # another program listens on port 70001
    _scripted(monkeypatch, 70001, 70002)
    channel = kernel.KernelVsock()
    channel.start()
    try:
        assert channel.guest_cid == 70002
        assert channel.device() == ("vhost-vsock-pci", {"guest-cid": "70002"})
        listener, port_arg = channel.listen_agent(1024)  # the asked port does not apply
        assert port_arg == "cid" and (listener.port, listener.guest_cid) == (70002, 70002)  # type: ignore[attr-defined]
        assert _free(70001)  # the CID whose port was taken was given back
        assert not _free(70002)  # ours, held
        with pytest.raises(MicroVMError, match="before start"):
            channel.listen_agent(1024)  # handed out once: the VM closes it
    finally:
        channel.stop()
    assert _free(70002)  # released with the channel
    assert channel.state() == {"guest_cid": 70002}


def test_the_kernel_channel_closes_an_agent_listener_it_never_handed_out(
    fake_kernel_listeners: type[_FakeKernelListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted(monkeypatch, 70010)
    channel = kernel.KernelVsock()
    channel.start()
    channel.stop()  # a VM that failed before it listened for its agent
    assert [listener.closed for listener in fake_kernel_listeners.made] == [True]
    channel.stop()  # twice is fine


def test_the_kernel_channel_does_not_retry_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(guest_cid: int, port: int) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(kernel, "KernelVsockListener", refuse)
    _scripted(monkeypatch, 70020)
    with pytest.raises(PermissionError):
        kernel.KernelVsock().start()
    assert _free(70020)  # not left claimed


def test_the_userspace_agent_listens_on_the_asked_port(tmp_path: Path) -> None:
    listener, port_arg = UserspaceVsock(tmp_path).listen_agent(1024)
    with listener:
        assert (listener.port, port_arg) == (1024, "1024")  # each VM has ports of its own


def test_host_mode_starts_in_the_hosts_cwd_when_the_guest_sees_it_there(tmp_path: Path) -> None:
    import dataclasses

    from pytest_microvm.image import GuestImage
    from pytest_microvm.machine import storage

    image = GuestImage.__new__(GuestImage)
    fields = {f.name: None for f in dataclasses.fields(GuestImage)}
    for name, value in {**fields, "root_kind": "host"}.items():
        object.__setattr__(image, name, value)
    plain = VMConfig()
    assert storage.default_cwd(image, "/work/repo", plain) == "/work/repo"  # through the host root
    assert storage.default_cwd(image, "/tmp/repo", plain) is None  # /tmp is the guest's own tmpfs
    # ... unless the host's directory is shared there, at the same path (--microvm-workers does).
    shared = VMConfig(shares={str(tmp_path): tmp_path})
    assert storage.default_cwd(image, str(tmp_path / "sub"), shared) == str(tmp_path / "sub")
    elsewhere = VMConfig(shares={str(tmp_path): tmp_path.parent})  # another host directory: not the same files
    assert storage.default_cwd(image, str(tmp_path), elsewhere) is None
    object.__setattr__(image, "root_kind", "initramfs")
    assert storage.default_cwd(image, "/work/repo", plain) is None
