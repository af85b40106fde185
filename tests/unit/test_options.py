"""The option table: one definition that the plugin and the CLI both derive from, and the
imports that starting either of them costs."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_microvm import cli, options
from pytest_microvm.machine.config import VMConfig
from pytest_microvm.options import IMAGE, OPTIONS, VM, Option, OptionError, add_cli_options, cli_values, vm_config

# What neither `microvm --help` nor loading the pytest plugin may import: QEMU's monitor
# client and asyncio, the image builder, the snapshot code, SSH, locks and retries.
HEAVY = ("asyncio", "qemu.qmp", "filelock", "tenacity", "paramiko", "pytest_microvm.image.builder",
         "pytest_microvm.machine.snapshot.policy", "pytest_microvm.machine.vm", "pytest_microvm.client")  # fmt: skip


@pytest.mark.parametrize("module", ["pytest_microvm.cli", "pytest_microvm.plugin"])
def test_starting_the_cli_or_the_plugin_imports_nothing_heavy(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_the_cli_starts_without_typing_or_logging() -> None:
    # Each is about a tenth of `microvm --help` (its goal: at most 5x `python -c pass`).
    code = "import sys, pytest_microvm.cli; print(' '.join(m for m in ('typing', 'logging') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_an_option_added_to_the_table_reaches_the_plugin_and_the_cli(
    monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester
) -> None:
    added = Option("balloon", "int", "a new option for this test", "3", cli=(VM,))
    monkeypatch.setattr(options, "OPTIONS", (*OPTIONS, added))
    run = argparse.ArgumentParser()
    add_cli_options(run, VM)
    assert cli_values(run.parse_args(["--balloon", "7"]), VM)["balloon"] == 7
    assert cli_values(run.parse_args([]), VM)["balloon"] == 3  # the table's default
    image = argparse.ArgumentParser()
    add_cli_options(image, IMAGE)
    assert "--balloon" not in image.format_help()  # only where the table says
    pytester.makeini("[pytest]\nmicrovm_balloon = 5\n")
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["*--microvm-balloon=MICROVM_BALLOON*", "*microvm_balloon (string)*"])
    pytester.makepyfile(
        "from pytest_microvm.plugin import _values\n"
        "def test_read(pytestconfig):\n"
        "    assert _values(pytestconfig)['balloon'] == 5  # the ini key, converted\n"
    )
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_cli_and_plugin_read_a_value_the_same_way() -> None:
    for option in OPTIONS:
        if option.kind == "int":
            assert option.convert("12") == 12
            with pytest.raises(OptionError, match="'lots' is not a number"):
                option.convert("lots")
        if option.choices:
            with pytest.raises(OptionError, match=f"'xen'; use {', '.join(option.choices[:-1])} or"):
                option.convert("xen")
    assert options.BY_NAME["packages"].convert("python3, curl") == ("python3", "curl")
    assert options.BY_NAME["shares"].convert(["/a:/x", "/b:/y:ro"]) == ("/a:/x", "/b:/y:ro")  # --share, twice
    assert options.BY_NAME["kernel"].convert("source") == ("source",)
    assert options.BY_NAME["cache-dir"].convert("/not/yet/made") == "/not/yet/made"  # a cache is made
    with pytest.raises(OptionError, match="/no/such does not exist"):
        options.BY_NAME["kernel"].convert("/no/such")


def test_the_kernel_option_is_a_matrix_in_the_order_given(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"")
    kernel = options.BY_NAME["kernel"]
    # ini files write lists over lines; a kernel named twice runs once.
    assert kernel.convert(f"source, debian:6.12\n{bz},source") == ("source", "debian:6.12", str(bz))
    assert kernel.convert("") is None and options.kernel_matrix({}) == (None,)
    for bad, why in (
        ("debian:", "write debian:VERSION"),
        ("debian:../x", "write debian:VERSION"),
        ("sauce", "sauce does not exist .a kernel is debian or source, debian:VERSION or a file"),
    ):
        with pytest.raises(OptionError, match=why):
            kernel.convert(bad)
    assert [options.kernel_id(k) for k in (None, "source", "debian:6.12", str(bz))] == [
        "linux-debian", "linux-source", "linux-debian:6.12", "linux-bzImage",
    ]  # fmt: skip
    # Never the vsock path's own id.
    assert all("kernel" not in options.kernel_id(k) for k in (None, "source", "debian:6.12"))


def test_modules_are_given_per_kernel_in_a_matrix(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    modules = options.BY_NAME["modules"]
    one = {"kernel": ("/k1",), "modules": modules.convert(str(a))}
    assert options.modules_for(one, "/k1") == str(a)
    matrix = {"kernel": ("/k1", "/k2", "source"), "modules": modules.convert(f"/k1={a},/k2={b}")}
    assert [options.modules_for(matrix, k) for k in ("/k1", "/k2", "source")] == [str(a), str(b), None]
    assert options.image_request(matrix, "/k2")["modules"] == str(b)
    with pytest.raises(OptionError, match="with several kernels, give each its modules as KERNEL=DIR"):
        options.modules_for({"kernel": ("/k1", "/k2"), "modules": modules.convert(str(a))}, "/k1")
    with pytest.raises(OptionError, match="does not exist or is not a directory"):
        modules.convert(f"/k1={tmp_path / 'missing'}")


def test_commands_that_boot_one_vm_take_one_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--kernel", "debian,source", "--", "true"]) == 2
    assert "microvm run uses one kernel, not 2 (debian, source)" in capsys.readouterr().err
    assert cli.main(["image", "check", "--kernel", "debian,source"]) == 2
    assert "microvm image check uses one kernel" in capsys.readouterr().err


def test_the_defaults_make_the_default_vmconfig() -> None:
    ours, plain = vm_config({}), VMConfig()
    assert dataclasses.asdict(ours) == dataclasses.asdict(plain)


def test_the_cli_says_which_flag_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--memory", "lots", "--", "true"]) == 2
    assert "error: --memory: 'lots' is not a number" in capsys.readouterr().err
    assert cli.main(["run", "--share", "no-colon", "--", "true"]) == 1  # checked before the image is built
    assert "share 'no-colon'" in capsys.readouterr().err


def test_every_vm_option_of_the_cli_is_a_plugin_option_or_says_why_not() -> None:
    for option in OPTIONS:
        if VM in option.cli and not option.plugin:
            # The plugin's VMs take it from the marker or VMConfig instead.
            assert option.name.replace("-", "_") in {f.name for f in dataclasses.fields(VMConfig)}
