"""The plugin as pytest loads it, driven through pytester."""

from __future__ import annotations

import pytest


def test_header_names_the_accelerator_and_why(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--strict-markers")
    result.stdout.fnmatch_lines(["microvm: x86_64 guests; QEMU *; kernel * (*); accel=* (*); vsock=* (*)"])
    result.assert_outcomes(passed=1)


def test_missing_kernel_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--microvm-kernel", "/no/such/kernel")
    result.stderr.fnmatch_lines(["*--microvm-kernel: /no/such/kernel does not exist*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_options_are_in_one_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["QEMU microVMs (pytest-microvm):", "*--microvm-kernel*", "*--microvm-cache-dir*"])


def test_ini_key_is_used(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmicrovm_modules = /no/such/modules\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    result.stderr.fnmatch_lines(["*--microvm-modules: /no/such/modules does not exist*"])


def test_bad_option_values_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    for args, message in (
        (["--microvm-memory", "lots"], "*--microvm-memory: 'lots' is not a number*"),
        (["--microvm-accel", "xen"], "*--microvm-accel: 'xen'; use auto, kvm or tcg*"),
        (["--microvm-memory", "16"], "*at least 64 MiB*"),
    ):
        result = pytester.runpytest(*args)
        result.stderr.fnmatch_lines([message])
        assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_forcing_kvm_without_kvm_is_reported_in_the_header(pytester: pytest.Pytester) -> None:
    from pytest_microvm.machine import detect_host

    if detect_host().kvm.usable:
        pytest.skip("this host has usable KVM: forcing it is not an error here")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--microvm-accel", "kvm")
    result.stdout.fnmatch_lines(["microvm: accel=kvm was forced, but *; use accel=tcg or auto"])


def test_marker_is_registered_and_strict_markers_pass(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(memory_mib=512)
        def test_marked():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.microvm(**config):*"])


def test_hookspecs_are_registered(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_microvm_qemu_args(config, argv):
            return argv

        def pytest_microvm_ready(vm):
            pass

        def pytest_microvm_config(config, request):
            return None
        """
    )
    pytester.makepyfile("def test_nothing(): pass")
    # An unknown pytest_* hook in a conftest is an error; ours are known.
    pytester.runpytest().assert_outcomes(passed=1)


def test_bad_root_and_share_options_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    for args, message in (
        (["--microvm-rootfs", "/no/such/root.tar"], "*--microvm-rootfs: /no/such/root.tar does not exist*"),
        (["--microvm-shares", "/no/such/dir:/src"], "*share /src: host path /no/such/dir does not exist*"),
        (["--microvm-shares", f"{pytester.path}:src"], "*share guest path 'src' is not absolute*"),
        (["--microvm-shares", "nocolon"], "*write HOST:GUEST or HOST:GUEST:ro*"),
        (["--microvm-packages", "python3", "--microvm-rootfs", "host"], "*packages and rootfs do not combine*"),
    ):
        result = pytester.runpytest(*args)
        result.stderr.fnmatch_lines([message])
        assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_a_marker_with_a_bad_share_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.microvm(shares={"relative": "/"})
        def test_marked(microvm_config):
            pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*share guest path 'relative' is not absolute*"])
