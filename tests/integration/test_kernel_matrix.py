"""The kernel matrix as a user runs it: ``--microvm-kernel A,B`` runs each VM test on every
kernel (pytester runs that boot real guests on Debian's kernel, one of the 6.12 series its
security suite carries, and the kernel built from source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_microvm import GuestImage

SUITE = """
import json, os
import pytest

def _record(name, vm):
    release = vm.run("uname -r").stdout.decode().strip()
    with open(os.environ["MATRIX_LOG"], "a") as f:
        f.write(json.dumps([name, release]) + "\\n")

def test_release(microvm, request):
    _record(request.node.name, microvm)

@pytest.mark.microvm(kernels=("source",))
def test_only_on_source(microvm, request):
    _record(request.node.name, microvm)

@pytest.mark.parametrize("path", ["kernel", "userspace"])
def test_ids_do_not_clash_with_vsock_paths(microvm, path, request):
    _record(request.node.name, microvm)

def test_factory_keeps_the_kernel(microvm_factory, microvm_kernel, request):
    vm = microvm_factory(memory_mib=192)
    _record(request.node.name, vm)

def test_module_vm_per_kernel(microvm_module, request):
    _record(request.node.name, microvm_module)

def test_without_a_vm():
    pass
"""


@pytest.fixture
def shared_cache(microvm_image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(microvm_image.directory.parents[1]))


def test_two_kernels_in_one_run_with_their_ids_and_header(
    pytester: pytest.Pytester, tmp_path: Path, shared_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_matrix=SUITE)
    log = tmp_path / "matrix.jsonl"
    monkeypatch.setenv("MATRIX_LOG", str(log))
    result = pytester.runpytest_subprocess(
        "--microvm-kernel", "debian:6.12,source", "-p", "no:cacheprovider", "-v", "-rs", timeout=900
    )
    result.assert_outcomes(passed=12)  # the marked test runs on source only: 5 VM tests x 2 + 1 + 1
    result.stdout.fnmatch_lines(
        [
            "microvm: kernel matrix: every VM test runs on each of 2 kernels",
            "microvm:   [[]linux-debian:6.12[]] 6.12.*",
            "microvm:   [[]linux-source[]] built from Debian's linux-source-*",
            "*test_release?linux-debian:6.12? PASSED*",
            "*test_release?linux-source? PASSED*",
            "*test_ids_do_not_clash_with_vsock_paths?linux-source-kernel? PASSED*",
        ],
        consecutive=False,
    )
    assert "test_only_on_source[linux-debian" not in result.stdout.str()
    releases = dict(json.loads(line) for line in log.read_text().splitlines())
    assert len(releases) == 11  # all but the test without a VM
    on_debian = {r for name, r in releases.items() if "linux-debian:6.12" in name}
    on_source = {r for name, r in releases.items() if "linux-source" in name}
    assert len(on_debian) == len(on_source) == 1, releases  # every VM of a kernel runs that kernel
    assert on_debian != on_source
    assert next(iter(on_debian)).startswith("6.12."), on_debian
    assert "test_without_a_vm" in result.stdout.str()
    assert "test_without_a_vm[" not in result.stdout.str()  # no VM fixture: not multiplied


def test_a_single_kernel_keeps_todays_ids(
    pytester: pytest.Pytester, shared_cache: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_matrix=SUITE)
    monkeypatch.setenv("MATRIX_LOG", str(tmp_path / "log"))
    result = pytester.runpytest_subprocess(
        "--microvm-kernel", "debian", "-p", "no:cacheprovider", "-v", "-rs", "-k", "release or only", timeout=600
    )
    # The marker still narrows: on another kernel than source, that test says why it does not run.
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*test_matrix.py::test_release PASSED*",
            "*SKIPPED*runs on kernel(s) source only*this run's kernels are debian (--microvm-kernel)*",
        ]
    )
    assert "linux-" not in result.stdout.str().split("test session starts")[1].split("microvm:")[0]


def test_bad_kernels_are_usage_errors_before_any_test(pytester: pytest.Pytester, shared_cache: None) -> None:
    pytester.makepyfile(test_matrix="def test_x(microvm):\n    pass\n")
    result = pytester.runpytest_subprocess("--microvm-kernel", "debian,/no/such/bzImage", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--microvm-kernel: /no/such/bzImage does not exist*"])
    result = pytester.runpytest_subprocess("--microvm-kernel", "debian:9.99", "-p", "no:cacheprovider", timeout=300)
    result.stdout.fnmatch_lines(
        ["*kernel debian:9.99: the host's apt sources have no linux-image-9.99-*; they offer*6.12*"]
    )
