"""The plugin on the kernel vhost-vsock path under xdist: fixtures, clones of one template made
in two workers at once, and a guest CID (and with it an agent port) per VM across workers.

Its own module so that ``--dist loadfile`` (the nested CI stage) runs it beside the other
kernel-path modules: it is the longest (a pytest inside, with two workers booting at once).
"""

from __future__ import annotations

import textwrap

import pytest

from tests.integration.paths import needs_kernel_path


@needs_kernel_path
def test_two_workers_get_distinct_cids_and_the_plugins_fixtures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    """The plugin on the kernel path under xdist: both workers clone one template at the same
    time; each clone claims a CID of its own, and its agent reached the port of that number."""
    pytester.makepyfile(
        textwrap.dedent(
            """
            import json, os, time
            from pathlib import Path

            SEEN = Path(os.environ["CID_DIR"])

            def meet(vm, name):
                # Both workers hold a VM at once before either lets go.
                assert vm.choice.vsock == "kernel", vm.choice
                assert vm.cloned, "a kernel-path VM is a clone by default"
                state = json.loads((vm.workdir / "vm.json").read_text())
                assert state["agent_port"] == vm.channel.guest_cid  # the agent's port is its CID
                (SEEN / name).write_text(str(vm.channel.guest_cid))
                deadline = time.monotonic() + 300
                while len(list(SEEN.iterdir())) < 2:
                    assert time.monotonic() < deadline, "the other worker never held its VM"
                    time.sleep(0.2)

            def test_fixture(microvm):
                assert microvm.run(["echo", "kernel"]).stdout == b"kernel\\n"
                meet(microvm, "fixture")

            def test_factory(microvm_factory):
                vm = microvm_factory()  # the fixture's configuration: a clone of the same template
                assert vm.run(["cat", "/proc/meminfo"]).exit_code == 0
                meet(vm, "factory")
            """
        )
    )
    seen = pytester.mkdir("cids")
    monkeypatch.setenv("CID_DIR", str(seen))
    kernel = pytestconfig.getoption("microvm_kernel")
    # No clone made ahead: each worker's first VM is its clone, both at once.
    args = ["-n", "2", "--microvm-vsock", "kernel", "--microvm-boot-timeout", "600", "--microvm-pool", "0"]
    result = pytester.runpytest_subprocess(*args, *(["--microvm-kernel", kernel] if kernel else []), timeout=900)
    result.assert_outcomes(passed=2)
    cids = {p.name: p.read_text() for p in seen.iterdir()}
    assert len(cids) == 2 and len(set(cids.values())) == 2, cids
