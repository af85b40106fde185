"""Past one machine with execnet's ``ssh`` gateway: ``pytest --tx ssh=HOST//python=PY``
runs the suite's tests on another machine, as it would on other KVM hosts. No other host is
reachable here, so the other machine is a VM reached over SSH: the host's userland
(``rootfs="host"``, so the same Python and pytest are there), Debian's dropbear from the
harness's SSH bundle, and QEMU's user-mode network forwarding its port 22 to the host, the
way any SSH host is reached. The host's OpenSSH client does the rest, as it would for a
real remote."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import GuestImage, MicroVM, Share, VMConfig, build_image
from pytest_microvm.image.sources import SSH_HOST_KEY, ssh_bundle
from pytest_microvm.machine.config import is_guest_own
from pytest_microvm.workers import python_dirs

REMOTE_SUITE = """
def test_runs_on_the_other_machine():
    assert "microvm.token=" in open("/proc/cmdline").read()

def test_fails_there():
    assert 6 * 7 == 41, "the-remote-failure-message"
"""


@pytest.fixture(scope="module")
def ssh_host(microvm_image: GuestImage, session_kernel: str | None, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Path]:  # fmt: skip
    """An SSH host (a VM) and the ssh_config entry ``worker-vm`` that reaches it; yields the config."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.fail("the OpenSSH client is not installed (apt-get install openssh-client; scripts/bootstrap does)")
    here = tmp_path_factory.mktemp("ssh")
    cache = microvm_image.directory.parents[1]
    bundle = ssh_bundle(cache, lambda _m: None)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(here / "key")], check=True)
    image = build_image(kernel=session_kernel, rootfs="host", cache=cache)
    # The bundle (in the cache) and this Python's environment, where the guest would not see
    # them (a cache or a CI clone under /tmp, which is the guest's own), come in read-only.
    needed = [bundle.root.resolve(), *python_dirs()]
    shares = {str(p): Share(p, readonly=True) for p in needed if is_guest_own(str(p))}
    with MicroVM(VMConfig(image=image, network=True, memory_mib=1024, shares=shares)).start() as vm:
        vm.run("mkdir -p /root/.ssh && chmod 700 /root/.ssh", check=True)
        vm.write_file("/root/.ssh/authorized_keys", (here / "key.pub").read_bytes(), mode=0o600)
        # The bundle's dropbear, run from the host's cache (the guest sees the host's / read-only),
        # with the bundle's libraries; the host's ld.so, libc and everything else are the guest's too.
        libs = ":".join(str(bundle.root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
        server = vm.start_process(
            ["env", f"LD_LIBRARY_PATH={libs}", str(bundle.root / "usr/sbin/dropbear"), "-F", "-E", "-p", "22",
             "-r", str(bundle.root / SSH_HOST_KEY.lstrip("/"))]
        )  # fmt: skip
        known = here / "known_hosts"
        port = vm.forwarded_ports[22]
        known.write_text(f"[127.0.0.1]:{port} {bundle.host_key}\n")  # the host key is checked, not trusted blindly
        config = here / "ssh_config"
        config.write_text(
            f"Host worker-vm\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {here / 'key'}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
        deadline = time.monotonic() + 60
        while subprocess.run(["ssh", "-F", str(config), "worker-vm", "true"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and not server.done, "dropbear in the VM never answered"
            time.sleep(0.5)
        yield config
        server.kill()


def test_xdist_ssh_gateway_runs_the_tests_on_the_other_machine(ssh_host: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_remote.py").write_text(REMOTE_SUITE)
    # What a user runs against other KVM hosts, with this VM's name in place of theirs.
    spec = f"ssh=-F {ssh_host} worker-vm//python={sys.executable}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tx", spec, "--rsyncdir", str(suite),
         "--dist", "load", "-W", "ignore::DeprecationWarning", str(suite)],
        cwd=suite, capture_output=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = proc.stdout.decode()
    assert proc.returncode == 1, out[-3000:] + proc.stderr.decode()[-2000:]
    assert "created: 1/1 worker" in out
    assert "1 failed, 1 passed" in out, out[-3000:]
    assert "AssertionError: the-remote-failure-message" in out
    assert f"[gw0] linux -- Python {sys.version.split()[0]}" in out  # the traceback came back through execnet
