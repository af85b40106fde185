"""The pytest plugin (entry point ``pytest11: microvm``): options, marker, hooks, fixtures.

Fixtures, smallest first — override the small ones in a conftest.py:

- ``microvm_kernel`` (session): the kernel of this test's VMs; with several kernels
  (``--microvm-kernel debian,source``) every test that uses a VM fixture runs once on each,
  with ``linux-<kernel>`` in its id (:func:`pytest_generate_tests`)
- ``microvm_image`` (session): the built guest image (cached; locked across xdist workers)
- ``microvm_config`` (function): the :class:`VMConfig` from options, ini keys, the
  ``microvm`` marker and the ``pytest_microvm_config`` hook
- ``microvm`` (function): a fresh VM for this test, torn down after it
- ``microvm_factory`` (function): as many fresh VMs as a test asks for; all torn down
- ``microvm_module`` / ``microvm_session``: one VM shared by a module's / the session's
  tests (from options and ini keys; markers do not apply), for suites whose tests do not
  need a fresh machine each

A "fresh VM" is a clone of a snapshot template where the configuration allows
(machine/snapshot/; ``--microvm-snapshot off`` or ``@pytest.mark.microvm(snapshot=False)``
for a real boot), made ahead by a pool so that it is ready when the test starts.

On a failed test each VM's console tail is attached to the report; with
``--microvm-keep-on-failure`` the VM stays up and the report says how to reach it.

SIGTERM (a CI timeout or cancellation) unwinds the session as Ctrl-C does, xdist workers
first (:mod:`pytest_microvm._sigterm`); VMs torn down after an interruption are stopped
at once, not powered off from inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_microvm import hookspecs
from pytest_microvm._sigterm import SigtermUnwinds
from pytest_microvm.options import (
    BY_NAME,
    OptionError,
    image_request,
    kernel_id,
    kernel_matrix,
    modules_for,
    plugin_options,
    vm_config,
)

# Only the standard library, pytest and the option table at the top (pytest-xdist's
# plugin.py is the model): a pytest run that uses no VM, and every xdist worker's start,
# do not load QEMU's monitor client, asyncio, the image builder or the snapshot code.
if TYPE_CHECKING:
    from pytest_microvm.image import GuestImage
    from pytest_microvm.machine import MicroVM, VMConfig
    from pytest_microvm.machine.pool import ClonePool

_VMS = pytest.StashKey[list["MicroVM"]]()
_CALL_FAILED = pytest.StashKey[bool]()
# By architecture, kernel and root_request().
_IMAGES = pytest.StashKey[dict[tuple[str, str | None, tuple[str, ...], str | None], "GuestImage"]]()
_POOL = pytest.StashKey["ClonePool"]()
_SIGTERM = pytest.StashKey[SigtermUnwinds]()
_INTERRUPTED = pytest.StashKey[bool]()
_VALUES = pytest.StashKey[dict[str, Any]]()
CONSOLE_IN_REPORT = 3000


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvm", "QEMU microVMs (pytest-microvm)")
    for option in plugin_options():
        choices = f" ({' | '.join(option.choices)})" if option.choices else ""
        group.addoption(option.flag, dest=option.ini, default=None, help=f"{option.help}{choices}. Ini: {option.ini}")
        parser.addini(option.ini, option.help, default=option.default)
    group.addoption(
        "--microvm-keep-on-failure",
        dest="microvm_keep_on_failure",
        action="store_true",
        default=None,
        help="leave the VM of a failed test running and say in the report how to reach it. "
        "Ini: microvm_keep_on_failure",
    )
    parser.addini("microvm_keep_on_failure", "keep VMs of failed tests running", type="bool", default=False)


def _values(config: pytest.Config) -> dict[str, Any]:
    """Every option's value, command line over ini, converted once; errors are UsageErrors
    a user can act on."""
    if _VALUES not in config.stash:
        values = {}
        for option in plugin_options():
            raw = config.getoption(option.ini)
            try:
                values[option.name] = option.convert(config.getini(option.ini) if raw is None else raw)
            except OptionError as exc:
                raise pytest.UsageError(f"{option.flag}: {exc}") from None
        config.stash[_VALUES] = values
    return config.stash[_VALUES]


def _setting(config: pytest.Config, name: str) -> Any:
    assert BY_NAME[name].plugin, name
    return _values(config)[name]


def _keep_on_failure(config: pytest.Config) -> bool:
    opt = config.getoption("microvm_keep_on_failure")
    return bool(config.getini("microvm_keep_on_failure") if opt is None else opt)


def _base_config(config: pytest.Config) -> VMConfig:
    from pytest_microvm.errors import ConfigError

    try:
        return vm_config(_values(config), keep=_keep_on_failure(config))
    except ConfigError as exc:
        raise pytest.UsageError(f"microvm: {exc}") from None


@pytest.hookimpl(tryfirst=True)  # before xdist's (trylast), which starts the workers from option.tx
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "microvm(**config): configure the `microvm` fixture for this test with VMConfig fields, "
        "e.g. @pytest.mark.microvm(memory_mib=512, vcpus=2, kernel_cmdline=('quiet',)); "
        "kernels=('source',) runs it on those kernels of the matrix only",
    )
    _base_config(config)  # a bad option or combination fails the run now, before any test
    if (_setting(config, "pool") or 0) < 0:
        raise pytest.UsageError("--microvm-pool: must be 0 or more")
    _configure_worker_vms(config)
    sigterm = config.stash[_SIGTERM] = SigtermUnwinds()
    sigterm.install()


def _configure_worker_vms(config: pytest.Config) -> None:
    """``--microvm-workers N``: xdist's workers are started by ``microvm run`` in N VMs
    (:mod:`pytest_microvm.workers`), through xdist's own popen gateways."""
    n = _setting(config, "workers") or 0
    if n < 0:
        raise pytest.UsageError("--microvm-workers: must be 0 or more")
    if n == 0 or hasattr(config, "workerinput"):
        return
    if not config.pluginmanager.hasplugin("xdist"):
        raise pytest.UsageError("--microvm-workers runs xdist's workers in VMs: install pytest-xdist")
    if config.getoption("tx", None) or config.getoption("numprocesses", None):
        raise pytest.UsageError("--microvm-workers N starts N workers of its own: drop -n / --tx")
    from pytest_microvm import workers

    shares = workers.shared_dirs(config.rootpath, config.invocation_params.dir)
    try:
        command = workers.worker_command(_values(config), shares, readonly=workers.python_dirs())
        spec = workers.gateway_spec(command)
    except ValueError as exc:
        raise pytest.UsageError(f"--microvm-workers: {exc}") from None
    config.option.tx = [spec] * n
    if config.getoption("dist", "no") == "no":
        config.option.dist = "load"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Before xdist starts the worker VMs (its sessionstart is trylast): their image is built
    # here once, with progress on the terminal, not by N `microvm run`s at once.
    config = session.config
    if (_setting(config, "workers") or 0) > 0 and not hasattr(config, "workerinput"):
        from pytest_microvm.image import build_image

        reporter = config.pluginmanager.get_plugin("terminalreporter")
        kernel = kernel_matrix(_values(config))[0]
        build_image(  # what workers.worker_command's `microvm run` asks for
            kernel=kernel,
            modules=modules_for(_values(config), kernel),
            rootfs="host",
            cache=_setting(config, "cache-dir"),
            progress=lambda m: reporter.write_line(f"microvm image: {m}") if reporter is not None else None,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    try:
        pool = config.stash.get(_POOL, None)
        if pool is not None:
            pool.close()  # the clones made ahead and not used: nothing of the pool outlives the session
    finally:
        sigterm = config.stash.get(_SIGTERM, None)
        if sigterm is not None:
            sigterm.uninstall()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist (controller): learn each worker's pid, so that SIGTERM reaches the workers,
    which hold the VMs, as a Ctrl-C at a terminal does."""
    sigterm = node.config.stash.get(_SIGTERM, None)
    # Not a popen with a python= command: its os.getpid() may be a guest's (--microvm-workers).
    if sigterm is not None and node.gateway.spec.popen and not node.gateway.spec.python:
        channel = node.gateway.remote_exec("import os; channel.send(os.getpid())")
        sigterm.workers.add(int(channel.receive(timeout=60)))
        channel.waitclose(timeout=60)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Before the runner tears fixtures down: after Ctrl-C or SIGTERM, VMs are stopped at
    # once (QEMU terminated), not powered off from inside, so the unwind stays short.
    interrupted = session.config.stash[_INTERRUPTED] = exitstatus == pytest.ExitCode.INTERRUPTED
    sigterm = session.config.stash.get(_SIGTERM, None)
    if interrupted and sigterm is not None and hasattr(session.config, "workerinput"):
        sigterm.shield()  # an xdist worker: see _sigterm


def _pool(config: pytest.Config) -> ClonePool:
    if _POOL not in config.stash:
        from pytest_microvm.machine.pool import ClonePool
        from pytest_microvm.machine.snapshot.policy import Templates

        config.stash[_POOL] = ClonePool(Templates(_setting(config, "cache-dir")), size=_setting(config, "pool") or 0)
    return config.stash[_POOL]


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_microvm import arch as arches
    from pytest_microvm.cache import cache_dir
    from pytest_microvm.errors import ConfigError
    from pytest_microvm.image.sources import describe_kernel
    from pytest_microvm.machine import choose, detect_host

    base = _base_config(config)
    host = detect_host(arch=base.arch)
    if host.qemu is None:
        return [f"microvm: {host.missing_qemu()}: VM tests will fail"]
    try:
        choice = choose(host, base.accel, base.vsock)
    except ConfigError as exc:
        return [f"microvm: {exc}"]
    arch = arches.get(base.arch)
    cache = cache_dir(_setting(config, "cache-dir"))
    kernels = kernel_matrix(_values(config))
    n_workers = _setting(config, "workers") or 0
    if len(kernels) == 1:
        kernel = describe_kernel(kernels[0], cache, arch)
        lines = [f"microvm: {arch.name} guests; QEMU {host.qemu_version}; kernel {kernel}; {choice.why}"]
    else:
        lines = [f"microvm: {arch.name} guests; QEMU {host.qemu_version}; {choice.why}"]
        lines.append(f"microvm: kernel matrix: every VM test runs on each of {len(kernels)} kernels")
        lines += [f"microvm:   [{kernel_id(k)}] {describe_kernel(k, cache, arch)}" for k in kernels]
    if _setting(config, "snapshot") == "off":
        lines.append("microvm: snapshots off: every VM boots")
    elif config.hook.pytest_microvm_qemu_args.get_hookimpls():
        lines.append("microvm: snapshots off: a pytest_microvm_qemu_args hook rewrites QEMU's command line")
    else:
        lines.append(f"microvm: fresh VMs are snapshot clones where possible, {_setting(config, 'pool')} made ahead")
    if choice.accel == "tcg":
        lines.append("microvm: WARNING: no usable KVM -- guests run under TCG emulation, several times slower")
    if n_workers:
        lines.append(
            f"microvm: the xdist workers run in {n_workers} VMs (the host's userland; {config.rootpath} shared "
            "read-write at the same path)"
        )
    return lines


# ---- fixtures -------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The kernel matrix: a test that uses a VM fixture runs once per kernel of
    ``--microvm-kernel`` (``[linux-source]`` in its id); ``@pytest.mark.microvm(kernels=...)``
    narrows that for one test. A single kernel adds nothing to the ids."""
    if "microvm_kernel" not in metafunc.fixturenames:
        return
    matrix = kernel_matrix(_values(metafunc.config))
    marker = metafunc.definition.get_closest_marker("microvm")
    wanted = marker.kwargs.get("kernels") if marker is not None else None
    if wanted is None:
        chosen = matrix
    else:
        if isinstance(wanted, str) or not all(isinstance(k, str) for k in wanted):
            raise pytest.UsageError(
                f"@pytest.mark.microvm(kernels=...) on {metafunc.definition.nodeid} takes a tuple of kernel names, "
                f"as --microvm-kernel writes them, e.g. kernels=('source',); got {wanted!r}"
            )
        chosen = tuple(k for k in matrix if any(_same_kernel(k, w) for w in wanted))
    if not chosen:
        reason = (
            f"runs on kernel(s) {', '.join(wanted or ())} only (@pytest.mark.microvm(kernels=...)); this run's "
            f"kernels are {', '.join(k or 'debian' for k in matrix)} (--microvm-kernel)"
        )
        skip = pytest.param(None, marks=pytest.mark.skip(reason=reason), id="linux-none")
        metafunc.parametrize("microvm_kernel", [skip], indirect=True, scope="session")
    elif len(matrix) > 1:
        ids = [kernel_id(k) for k in chosen]
        metafunc.parametrize("microvm_kernel", chosen, indirect=True, ids=ids, scope="session")


def _same_kernel(kernel: str | None, name: str) -> bool:
    """Whether the marker's ``name`` is the matrix's ``kernel`` (a path as written or resolved)."""
    import os

    given = kernel or "debian"
    return name == given or (os.path.exists(name) and os.path.abspath(name) == os.path.abspath(given))


@pytest.fixture(scope="session")
def microvm_kernel(request: pytest.FixtureRequest) -> str | None:
    """The kernel of this test's VMs, as ``--microvm-kernel`` names it (None: the default,
    Debian's): the only one, or this test's entry of the kernel matrix."""
    kernel: str | None = getattr(request, "param", kernel_matrix(_values(request.config))[0])
    return kernel


def _image(
    config: pytest.Config, packages: tuple[str, ...], rootfs: str | None, arch: str, kernel: str | None
) -> GuestImage:
    """The image with this kernel, the session's features, and this root and architecture;
    built once per session for each asked for (cached across sessions, locked across workers)."""
    from pytest_microvm.image import build_image
    from pytest_microvm.image.builder import root_request

    images = config.stash.setdefault(_IMAGES, {})
    key = (arch, kernel, *root_request(packages, rootfs))
    if key not in images:
        reporter = config.pluginmanager.get_plugin("terminalreporter")

        def progress(message: str) -> None:
            if reporter is not None:
                reporter.write_line(f"microvm image: {message}")

        try:
            request = {**image_request(_values(config), kernel), "packages": packages, "rootfs": rootfs, "arch": arch}
        except OptionError as exc:
            raise pytest.UsageError(f"microvm: {exc}") from None
        images[key] = build_image(**request, progress=progress)
    return images[key]


@pytest.fixture(scope="session")
def microvm_image(pytestconfig: pytest.Config, microvm_kernel: str | None) -> GuestImage:
    """The guest image, built once per session and kernel (cached across sessions, locked across workers)."""
    return _image(
        pytestconfig,
        _setting(pytestconfig, "packages") or (),
        _setting(pytestconfig, "rootfs"),
        _base_config(pytestconfig).arch,
        microvm_kernel,
    )


@pytest.fixture
def microvm_config(request: pytest.FixtureRequest, microvm_image: GuestImage, microvm_kernel: str | None) -> VMConfig:
    """The VM configuration for this test: options and ini keys, then the marker, then hooks."""
    from pytest_microvm.errors import ConfigError
    from pytest_microvm.machine import VMConfig

    cfg = _base_config(request.config).with_(image=microvm_image)
    marker = request.node.get_closest_marker("microvm")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("@pytest.mark.microvm takes keyword arguments only (VMConfig fields)")
        fields = {f.name for f in dataclasses.fields(VMConfig)}
        changes = {k: v for k, v in marker.kwargs.items() if k != "kernels"}  # pytest_generate_tests's
        unknown = set(changes) - fields
        if unknown:
            raise pytest.UsageError(
                f"@pytest.mark.microvm: unknown field(s) {sorted(unknown)}; known: {sorted(fields)} and kernels"
            )
        try:
            cfg = _changed(request.config, cfg, changes, microvm_kernel)
        except ConfigError as exc:
            raise pytest.UsageError(f"@pytest.mark.microvm: {exc}") from None
    hooked = request.config.hook.pytest_microvm_config(config=cfg, request=request)
    return hooked if hooked is not None else cfg


def _changed(config: pytest.Config, cfg: VMConfig, changes: dict[str, Any], kernel: str | None) -> VMConfig:
    """``cfg`` with the marker's or factory's changes; a new root comes with its image (on ``kernel``)."""
    changes = dict(changes)
    # A root asked for here replaces the session's: packages= drops a session rootfs and back.
    if "packages" in changes and "rootfs" not in changes:
        changes["rootfs"] = None
    if "rootfs" in changes and "packages" not in changes:
        changes["packages"] = ()
    cfg = cfg.with_(**changes)
    if ("packages" in changes or "rootfs" in changes or "arch" in changes) and "image" not in changes:
        cfg = cfg.with_(image=_image(config, cfg.packages, cfg.rootfs, cfg.arch, kernel))
    return cfg


def _start(config: pytest.Config, cfg: VMConfig, name: str, *, pooled: bool = True) -> MicroVM:
    """A started VM: a clone (made ahead when ``pooled``) where possible, else a boot."""
    hook = config.hook
    _refuse_nested(config, cfg)

    def qemu_args(config: VMConfig, argv: list[str]) -> list[str]:
        changed = hook.pytest_microvm_qemu_args(config=config, argv=list(argv))
        return list(changed) if changed is not None else argv

    # A hook that rewrites QEMU's arguments could make a template's command line differ
    # from its clones': VMs boot when a conftest or plugin implements one.
    args_hook = qemu_args if hook.pytest_microvm_qemu_args.get_hookimpls() else None
    pool = _pool(config)
    if pooled:
        vm = pool.take(cfg, name=name, qemu_args_hook=args_hook)
    else:
        vm = pool.templates.start(cfg, name=name, qemu_args_hook=args_hook)
    try:
        hook.pytest_microvm_ready(vm=vm)
    except BaseException:
        vm.stop(graceful=False)  # nobody else holds it yet
        raise
    return vm


def _refuse_nested(config: pytest.Config, cfg: VMConfig) -> None:
    """Fail a test that would boot a VM inside a worker VM without KVM, saying what it needs."""
    from pytest_microvm import workers

    if not workers.in_worker_vm():
        return
    from pytest_microvm.machine import detect_host

    accel = "kvm" if detect_host(arch=cfg.arch).kvm.usable else "tcg"
    why = workers.nested_vm_error(_setting(config, "accel"), accel)
    if why is not None:
        pytest.fail(f"microvm: {why}", pytrace=False)


def _boot(request: pytest.FixtureRequest, cfg: VMConfig, name: str) -> MicroVM:
    vm = _start(request.config, cfg, name)
    request.node.stash.setdefault(_VMS, []).append(vm)
    return vm


def _teardown(request: pytest.FixtureRequest, vm: MicroVM) -> None:
    failed = request.node.stash.get(_CALL_FAILED, False)
    vm.stop(keep=failed and vm.config.keep, graceful=not request.config.stash.get(_INTERRUPTED, False))


@pytest.fixture
def microvm(request: pytest.FixtureRequest, microvm_config: VMConfig) -> Iterator[MicroVM]:
    """A booted VM for this test (configured by ``microvm_config``); stopped afterwards."""
    vm = _boot(request, microvm_config, "vm")
    try:
        yield vm
    finally:
        _teardown(request, vm)


@pytest.fixture
def microvm_factory(
    request: pytest.FixtureRequest, microvm_config: VMConfig, microvm_kernel: str | None
) -> Iterator[Callable[..., MicroVM]]:
    """Boot VMs on demand: ``microvm_factory(memory_mib=512)``; all stopped after the test."""
    vms: list[MicroVM] = []

    def make(**overrides: Any) -> MicroVM:
        vm = _boot(request, _changed(request.config, microvm_config, overrides, microvm_kernel), f"vm{len(vms)}")
        vms.append(vm)
        return vm

    try:
        yield make
    finally:
        for vm in vms:
            _teardown(request, vm)


def _shared_vm(request: pytest.FixtureRequest, image: GuestImage, name: str) -> Iterator[MicroVM]:
    vm = _start(request.config, _base_config(request.config).with_(image=image), name, pooled=False)
    try:
        yield vm
    finally:
        # No single failed test owns it: never left running.
        vm.stop(keep=False, graceful=not request.config.stash.get(_INTERRUPTED, False))


@pytest.fixture(scope="module")
def microvm_module(request: pytest.FixtureRequest, microvm_image: GuestImage) -> Iterator[MicroVM]:
    """One VM for all tests of a module (options and ini keys; no marker): what one test
    leaves in the guest, the next one sees. For modules of read-only checks."""
    yield from _shared_vm(request, microvm_image, "module-vm")


@pytest.fixture(scope="session")
def microvm_session(request: pytest.FixtureRequest, microvm_image: GuestImage) -> Iterator[MicroVM]:
    """One VM for the whole session (per xdist worker); as ``microvm_module``, wider."""
    yield from _shared_vm(request, microvm_image, "session-vm")


# ---- reports --------------------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    vms = item.stash.get(_VMS, [])
    if not vms or not report.failed:
        return report
    if report.when == "call":
        item.stash[_CALL_FAILED] = True
    for vm in vms:
        console = vm.console()
        if console:
            report.sections.append((f"microvm {vm.name} console (tail)", console[-CONSOLE_IN_REPORT:]))
        if vm.config.keep and report.when == "call" and vm.workdir is not None:
            report.sections.append(
                (
                    f"microvm {vm.name} kept running",
                    f"state: {vm.workdir / 'vm.json'} (token, sockets, pids)\n"
                    f"console: {vm.workdir / 'console.log'}\nQMP and sockets: see 'qmp' and 'sockets' in vm.json\n"
                    f"reach it: microvm attach {vm.workdir}\n"
                    f"stop it: microvm stop {vm.workdir}\n"
                    f"  (by hand: kill {' '.join(str(p) for p in vm.pids)}; rm -r {vm.workdir})",
                )
            )
    return report
