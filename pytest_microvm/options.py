"""The VM options, each defined once: the plugin's flags and ini keys and the CLI's flags
are derived from :data:`OPTIONS`, and :func:`vm_config` turns their values into a VMConfig.

Adding an option is one entry here (and the VMConfig field it sets, if any). The standard
library only: the plugin and ``microvm --help`` read this table before anything heavy loads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping

from pytest_microvm import arch as arches

TYPE_CHECKING = False  # typing and dataclasses would be a third of `microvm --help`'s time
if TYPE_CHECKING:
    from typing import Any

    from pytest_microvm.image import GuestImage
    from pytest_microvm.machine.config import VMConfig

ACCELS = ("auto", "kvm", "tcg")
VSOCKS = ("auto", "kernel", "userspace")
KERNEL_KEYWORDS = ("debian", "source")
APT_KERNEL = "debian:"  # debian:VERSION names linux-image-VERSION-<arch> of the host's apt sources
KERNEL_HELP = (
    "guest kernel: debian (default; the distribution's: Debian's linux-image-amd64 or -arm64, Ubuntu's "
    "linux-image-virtual), debian:VERSION (the package "
    "linux-image-VERSION-amd64 or -arm64 of the host's apt sources: debian:6.1.0-44, debian:6.12, "
    "debian:6.12.48+deb12, debian:cloud), source (a small kernel built once from Debian's linux-source: boots "
    "in about half the time), or a bzImage, vmlinux or kernel .deb"
)
CONTAINER_PREFIXES = ("oci:", "docker-archive:")  # image.oci's; the option table imports nothing heavy
MATRIX_HELP = "; several, comma-separated, run every VM test once on each (the kernel matrix)"

# Where the CLI takes an option: "vm" (run, shell), "image" (image build, image check), "doctor".
VM, IMAGE, DOCTOR = "vm", "image", "doctor"


class OptionError(ValueError):
    """A value an option cannot take; the message says which and why."""


class Option:
    """One VM option.

    ``name`` gives the pytest flag ``--microvm-NAME``, the ini key ``microvm_NAME`` (dashes
    as underscores) and, where ``cli`` names commands, the CLI flag ``--NAME`` (or ``cli_flag``).
    ``kind`` is how a value is read: int, float, str, list (comma-separated; on the CLI a
    repeated flag where ``cli_repeat``), path (must exist), kernels (a list of keywords,
    ``debian:VERSION`` or paths: the kernel matrix), modules (a list of ``DIR`` or
    ``KERNEL=DIR``), rootfs ("host", ``oci:DIR[:TAG]``, ``docker-archive:FILE`` or a path),
    flag (on or off). ``default`` is written as in an ini file.
    ``cli_hidden``: the commands of ``cli`` whose --help does not show it. ``plugin``: a
    pytest option and ini key (else the marker and VMConfig only).
    ``template_key``: whether the value is part of a snapshot template's key (directly, or
    through the image it builds), so that VMs that differ in it never share a template.
    """

    __slots__ = (
        "choices",
        "cli",
        "cli_flag",
        "cli_hidden",
        "cli_repeat",
        "default",
        "help",
        "kind",
        "metavar",
        "name",
        "plugin",
        "template_key",
    )  # fmt: skip

    def __init__(
        self, name: str, kind: str, help: str, default: str | None = None, choices: tuple[str, ...] = (), *,
        cli: tuple[str, ...] = (), cli_hidden: tuple[str, ...] = (), cli_flag: str | None = None,
        cli_repeat: bool = False, metavar: str | None = None, template_key: bool = False, plugin: bool = True,
    ) -> None:  # fmt: skip
        self.name, self.kind, self.help, self.default, self.choices = name, kind, help, default, choices
        self.cli, self.cli_hidden, self.cli_flag, self.cli_repeat = cli, cli_hidden, cli_flag, cli_repeat
        self.metavar, self.template_key, self.plugin = metavar, template_key, plugin

    def __repr__(self) -> str:
        return f"Option({self.name!r})"

    @property
    def ini(self) -> str:
        return "microvm_" + self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return f"--microvm-{self.name}"

    def convert(self, value: Any) -> Any:
        """``value`` as written (a string, or a list of them for a repeated CLI flag) as this
        option's type; None for no value. OptionError says what is wrong."""
        if value in (None, "", []):
            return None
        if self.kind == "flag":
            return bool(value)
        if self.kind in ("list", "kernels", "modules"):
            items = value if isinstance(value, list) else [value]
            values = tuple(v.strip() for item in items for v in str(item).replace("\n", ",").split(",") if v.strip())
            if self.kind == "kernels":
                return tuple(dict.fromkeys(_kernel(v) for v in values)) or None
            if self.kind == "modules":
                return tuple(_modules_entry(v) for v in values) or None
            return values
        value = str(value)
        if self.choices and value not in self.choices:
            raise OptionError(f"{value!r}; use {_either(self.choices)}")
        try:
            if self.kind == "int":
                return int(value)
            if self.kind == "float":
                return float(value)
        except ValueError:
            raise OptionError(f"{value!r} is not a number") from None
        if self.kind == "rootfs" and value == "host":
            return value
        if self.kind == "rootfs" and value.startswith(CONTAINER_PREFIXES):
            path = value.split(":", 2)[1]  # oci:DIR[:TAG], docker-archive:FILE
            if not path or not os.path.exists(path):
                raise OptionError(f"{value}: {path or 'the path'} does not exist")
            return value
        if self.kind in ("path", "rootfs") and not os.path.exists(value):
            raise OptionError(f"{value} does not exist")
        return value


def _kernel(value: str) -> str:
    """One kernel of the matrix as given: a keyword, ``debian:VERSION``, or a file that exists."""
    if value in KERNEL_KEYWORDS:
        return value
    if value.startswith(APT_KERNEL):
        if not value.removeprefix(APT_KERNEL) or "/" in value:
            raise OptionError(f"{value!r}: write debian:VERSION, VERSION as in linux-image-VERSION-amd64 (e.g. 6.12)")
        return value
    if not os.path.exists(value):
        raise OptionError(f"{value} does not exist (a kernel is {_either(KERNEL_KEYWORDS)}, debian:VERSION or a file)")
    return value


def _modules_entry(value: str) -> tuple[str | None, str]:
    """``DIR`` (the one kernel's modules) or ``KERNEL=DIR`` (that kernel's, in a matrix)."""
    kernel, sep, path = value.rpartition("=")
    if not sep:
        kernel, path = "", value
    if not os.path.isdir(path):
        raise OptionError(f"{path} does not exist or is not a directory")
    return (kernel or None), path


def kernel_matrix(values: Mapping[str, Any]) -> tuple[str | None, ...]:
    """The kernels VMs run on, in the order given; (None,) is the one default kernel."""
    return tuple(values.get("kernel") or ()) or (None,)


def kernel_id(kernel: str | None) -> str:
    """A kernel's part of a test id: ``linux-source``, ``linux-debian:6.12``, ``linux-bzImage``.

    Never ``kernel``: the vsock-path parameters already use ``[kernel]`` and ``[userspace]``.
    """
    name = kernel or "debian"
    if name not in KERNEL_KEYWORDS and not name.startswith(APT_KERNEL):
        name = os.path.basename(name.rstrip("/")) or name
    return "linux-" + name


def modules_for(values: Mapping[str, Any], kernel: str | None) -> str | None:
    """The module tree given for ``kernel``: its ``KERNEL=DIR`` entry, else a bare DIR when
    there is one kernel. OptionError for a bare DIR in a matrix (which kernel's is it?)."""
    entries = values.get("modules") or ()
    for name, path in entries:
        if name is not None and name == kernel:
            return str(path)
    bare = [path for name, path in entries if name is None]
    if bare and len(kernel_matrix(values)) > 1:
        raise OptionError(f"--microvm-modules {bare[0]}: with several kernels, give each its modules as KERNEL=DIR")
    return bare[0] if bare else None


def _either(choices: Iterable[str]) -> str:
    *first, last = choices
    return f"{', '.join(first)} or {last}"


OPTIONS: tuple[Option, ...] = (
    Option("accel", "str", "how guests run (auto: kvm when usable, else tcg, with a warning)", "auto",
           ACCELS, cli=(VM, DOCTOR), template_key=True),
    Option("vsock", "str", "the vsock device's backend (auto: kernel where /dev/vhost-vsock is usable)", "auto",
           VSOCKS, cli=(VM, DOCTOR), template_key=True),
    Option("arch", "str", "guest architecture (default: the host's; another runs under TCG emulation)", None,
           arches.NAMES, cli=(VM, IMAGE, DOCTOR), template_key=True),
    Option("kernel", "kernels", KERNEL_HELP + MATRIX_HELP, cli=(VM, IMAGE, DOCTOR),
           metavar="debian|debian:VERSION|source|PATH", template_key=True),
    Option("modules", "modules", "lib/modules/<release> tree for the kernel, if it needs modules (in a matrix: "
           "KERNEL=DIR for each kernel that needs them, comma-separated)",
           cli=(VM, IMAGE), cli_hidden=(VM,), metavar="DIR", template_key=True),
    Option("memory", "int", "guest memory in MiB", "256", cli=(VM,), metavar="MIB", template_key=True),
    Option("vcpus", "int", "guest vCPUs (under TCG one is fastest)", "1", cli=(VM,), metavar="N", template_key=True),
    Option("boot-timeout", "float",
           "seconds a guest may take to become ready (default 120, or $MICROVM_BOOT_TIMEOUT)", cli=(VM,),
           metavar="S"),
    # "str", not "path": a cache directory that does not exist yet is made.
    Option("cache-dir", "str", "image cache (default: $MICROVM_CACHE_DIR or ~/.cache/pytest-microvm)",
           cli=(VM, IMAGE, DOCTOR), cli_hidden=(VM, DOCTOR), metavar="DIR"),
    Option("features", "list", "image features, comma-separated: ssh (dropbear, for vm.ssh())",
           cli=(VM, IMAGE), metavar="A,B", template_key=True),
    Option("packages", "list", "distro packages for the guest's root, comma-separated, from the host's apt",
           cli=(VM, IMAGE), metavar="A,B", template_key=True),
    Option("rootfs", "rootfs", "the guest's root instead: a directory, a tar, a container image (oci:DIR[:TAG], "
           "docker-archive:FILE), or host (the host's / over 9p)",
           cli=(VM, IMAGE), metavar="DIR|TAR|oci:DIR[:TAG]|docker-archive:FILE|host", template_key=True),
    # Only how many shares is in a template's key: their host paths live in QEMU's fsdev.
    Option("shares", "list", "host directories in the guest over 9p: HOST:GUEST[:ro] (:ro refuses writes), "
           "comma-separated; on the CLI --share, once for each", cli=(VM,), cli_flag="--share", cli_repeat=True,
           metavar="HOST:GUEST[:ro]", template_key=True),
    Option("network", "flag", "give the guest a NIC on QEMU's user-mode network (NAT); such VMs boot",
           cli=(VM,), plugin=False),
    Option("snapshot", "str", "auto: fresh VMs are clones of a snapshot template where possible; off: they boot",
           "auto", ("auto", "off"), cli=(VM,)),
    Option("pool", "int", "clones made ahead in the background, of the configuration used last (0: none)", "1"),
    Option("workers", "int", "run the xdist workers themselves in N VMs (the host's userland, the rootdir shared "
           "read-write): every test runs in a guest; replaces -n", "0"),
)  # fmt: skip

BY_NAME = {o.name: o for o in OPTIONS}


def plugin_options() -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.plugin)


def add_cli_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The options ``command`` (VM, IMAGE or DOCTOR) takes, as argparse flags; their values
    stay strings (or lists) for :func:`cli_values` to read as the plugin does."""
    for o in OPTIONS:
        if command not in o.cli:
            continue
        flag = o.cli_flag or f"--{o.name}"
        default = f" (default {o.default})" if o.default else ""
        text = argparse.SUPPRESS if command in o.cli_hidden else o.help + default
        dest = o.name.replace("-", "_")
        if o.kind == "flag":
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        else:
            action = "append" if o.cli_repeat else "store"
            parser.add_argument(
                flag, dest=dest, action=action, choices=o.choices or None, default=None, metavar=o.metavar, help=text
            )


def cli_values(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options of ``command`` from parsed arguments, converted; OptionError names the flag."""
    values = {}
    for o in OPTIONS:
        if command in o.cli:
            raw = getattr(args, o.name.replace("-", "_"))
            try:
                values[o.name] = o.convert(o.default if raw is None else raw)
            except OptionError as exc:
                raise OptionError(f"{o.cli_flag or '--' + o.name}: {exc}") from None
    return values


def vm_config(values: Mapping[str, Any], image: GuestImage | None = None, **changes: Any) -> VMConfig:
    """The VMConfig the options' ``values`` (by name, converted; absent: the default) ask for."""
    from pytest_microvm.machine.config import Share, VMConfig, default_boot_timeout

    def value(name: str) -> Any:
        if name in values:
            return values[name]
        return BY_NAME[name].convert(BY_NAME[name].default)

    return VMConfig(
        image=image,
        memory_mib=value("memory"),
        vcpus=value("vcpus"),
        accel=value("accel"),
        vsock=value("vsock"),
        boot_timeout=value("boot-timeout") or default_boot_timeout(),
        network=bool(value("network")),
        packages=value("packages") or (),
        rootfs=value("rootfs"),
        shares=dict(Share.parse(spec) for spec in value("shares") or ()),
        snapshot=value("snapshot") != "off",
        **({"arch": value("arch")} if value("arch") else {}),
        **changes,
    )


def one_kernel(values: Mapping[str, Any], what: str) -> str | None:
    """The kernel of a command that boots one (``what`` names it); OptionError for several."""
    kernels = kernel_matrix(values)
    if len(kernels) > 1:
        raise OptionError(
            f"--kernel: {what} uses one kernel, not {len(kernels)} ({', '.join(str(k) for k in kernels)}); "
            "a kernel matrix is for pytest (--microvm-kernel A,B) and `microvm image build`"
        )
    return kernels[0]


def image_request(values: Mapping[str, Any], kernel: str | None) -> dict[str, Any]:
    """build_image's keyword arguments from the options' ``values`` (by name, converted), for
    ``kernel``: one of :func:`kernel_matrix` (None: the default kernel)."""
    return {
        "kernel": kernel,
        "modules": modules_for(values, kernel),
        "cache": values.get("cache-dir"),
        "features": values.get("features") or (),
        "packages": values.get("packages") or (),
        "rootfs": values.get("rootfs"),
        "arch": values.get("arch"),
    }
