"""The plugin as pytest loads it, driven through pytester."""

from __future__ import annotations

import pytest


def test_header_names_the_accelerator_and_why(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--strict-markers")
    result.stdout.fnmatch_lines(["microvm: accel=* (*); QEMU *"])
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
