"""A small kernel built from Debian's kernel source: ``build_image(kernel="source")``.

Why: under TCG most of a boot is the kernel's own start-up, and Debian's kernel is
built for every machine there is. ``make tinyconfig`` plus the options in
``guest-image/kernel/microvm.config`` and the guest architecture's
``microvm-<arch>.config`` (everything the guest needs, built in) boots in about half the
time and loads no modules. For another architecture than the host's it is cross-built
(``ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-``) from the same source. The price is one build per source version
and config (minutes on two cores), after which the result sits in the cache like any
other ingredient.

The source is Debian's ``linux-source`` package (``apt-get download``, no root). The
build needs ``make``, ``gcc``, ``flex``, ``bison``, ``bc`` and ``libelf-dev``; what is
missing is named with the package that brings it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pytest_microvm import arch as arches
from pytest_microvm.cache import cached_build
from pytest_microvm.errors import ImageError
from pytest_microvm.image.sources import (
    SOURCE_PACKAGE,
    KernelFiles,
    Progress,
    apt_download,
    resolve_package,
    run_tool,
)

CONFIG_NAME = "microvm.config"
# Bump when the steps below change what comes out for the same source and config.
RECIPE_VERSION = "1"
_BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}


def kernel_config_path() -> Path:
    """The config fragment: shipped inside the wheel, or guest-image/kernel in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_guest" / "kernel", here.parent / "guest-image" / "kernel"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate / CONFIG_NAME
    raise ImageError(f"the kernel config ({CONFIG_NAME}) is missing from this installation; reinstall pytest-microvm")


def kernel_fragments(arch: arches.Arch) -> list[Path]:
    """The fragments merged in order: the common one, then the architecture's own."""
    common = kernel_config_path()
    own = common.with_name(f"microvm-{arch.name}.config")
    if not own.is_file():
        raise ImageError(f"the kernel config for {arch.name} ({own.name}) is missing; reinstall pytest-microvm")
    return [common, own]


def wanted_options(fragment: str) -> dict[str, str]:
    """``{"CONFIG_X": "y" | "n"}`` from a fragment of ``CONFIG_X=y`` / ``# CONFIG_X is not set`` lines."""
    options = {}
    for line in fragment.splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(\S+)", line.strip()):
            options[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            options[m.group(1)] = "n"
    return options


def missing_options(wanted: dict[str, str], config: str) -> list[str]:
    """The options of ``wanted`` that the final .config does not have as asked.

    Kconfig silently drops an option whose dependencies are not met; without this
    check a typo or a renamed option would give a kernel that boots without, say, vsock.
    """
    have = wanted_options(config)
    return sorted(name for name, value in wanted.items() if have.get(name, "n") != value)


def check_build_tools(arch: arches.Arch | None = None) -> None:
    """Raise ImageError naming the Debian packages to install if a build tool is missing
    (for another architecture: its cross compiler too)."""
    missing = [pkg for tool, pkg in _BUILD_TOOLS.items() if shutil.which(tool) is None]
    if arch is not None and not arch.native and shutil.which(arch.cross_compilers[0]) is None:
        missing.append(arch.cross_packages.split()[0])
    if not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")
    if missing:
        raise ImageError(
            "building the kernel from source needs " + ", ".join(missing) + f": apt-get install {' '.join(missing)}"
        )


def _unpack_source(deb: Path, dest: Path, progress: Progress) -> Path:
    """Unpack the source tarball that the linux-source .deb carries; return the tree."""
    outer = dest / "deb"
    run_tool(["dpkg-deb", "-x", str(deb), str(outer)], f"unpacking {deb.name}")
    tarballs = sorted(outer.glob("usr/src/**/linux-source-*.tar.*"))
    if not tarballs:
        raise ImageError(f"{deb.name} holds no usr/src/linux-source-*.tar.*: not a kernel source package")
    progress(f"unpacking {tarballs[0].name}")
    # tar(1), not tarfile: it unpacks the 80,000 files several times faster.
    run_tool(["tar", "-xf", str(tarballs[0]), "-C", str(dest)], f"unpacking {tarballs[0].name}")
    shutil.rmtree(outer)
    trees = [p for p in dest.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise ImageError(f"{tarballs[0].name} did not unpack into one kernel tree")
    return trees[0]


def _make(tree: Path, args: list[str], what: str, progress: Progress, log: Path) -> None:
    """Run make in ``tree``, reporting progress every few seconds, the log's tail on failure.

    make runs in its own process group, so that Ctrl-C (or any other exception here)
    stops the compilers it started too, not only make: nothing keeps building after us.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["make", "-C", str(tree), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            started = last = time.monotonic()
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() - last >= 15:
                    last = time.monotonic()
                    text = log.read_bytes()
                    compiled = sum(1 for line in text.splitlines() if line.lstrip().startswith(b"CC "))
                    now = text[-4096:].decode(errors="replace").strip().rsplit("\n", 1)[-1].strip()
                    progress(f"{what}: {time.monotonic() - started:.0f}s, {compiled} files compiled, now {now}")
        except BaseException:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
                    break
            raise
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise ImageError(f"{what} failed (make {' '.join(args)}, exit {proc.returncode}); the log is {log}:\n{tail}")


def source_kernel(cache: Path, progress: Progress, arch: arches.Arch | None = None) -> KernelFiles:
    """The kernel built from Debian's source with the microvm config, for ``arch`` (default
    the host's; cross-built for another), built once and cached."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ImageError("building the kernel from source needs apt-get and dpkg-deb (Debian/Ubuntu)")
    arch = arch or arches.get()
    fragments = kernel_fragments(arch)
    fragment = "".join(p.read_text() for p in fragments)
    wanted = wanted_options(fragment)
    # The source is the host's (linux-source is the same for every architecture).
    real, version = resolve_package(cache, SOURCE_PACKAGE, meta=True, provider="linux-source-")
    compiler = "gcc" if arch.native else arch.cross_compilers[0]
    gcc = shutil.which(compiler)  # if missing, the build below says what to install
    cc = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.split("\n")[0] if gcc else ""
    digest = hashlib.sha256(f"{RECIPE_VERSION}\n{cc}\n{fragment}".encode()).hexdigest()[:12]
    name = re.sub(r"[^\w.+-]", "_", f"{real}_{version}")
    key = f"{name}-microvm-{arch.name}-{digest}"
    final = cache / "kernels" / key
    make_arch = arch.make_args()

    def build(dest: Path) -> None:
        check_build_tools(arch)
        jobs = os.cpu_count() or 1
        progress(
            f"building a {arch.name} kernel from {real} {version} ({jobs} jobs; minutes, once per version and config)"
        )
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".src-") as tmp:
            work = Path(tmp)
            progress(f"downloading {real} {version}")
            tree = _unpack_source(apt_download(real, work), work, progress)
            # Beside the cache entry, not in it: a failed build's staging directory goes away.
            log = final.parent / f"{final.name}.build.log"
            log.unlink(missing_ok=True)
            _make(tree, [*make_arch, "tinyconfig"], "make tinyconfig", progress, log)
            run_tool(
                [str(tree / "scripts/kconfig/merge_config.sh"), "-m", ".config", *map(str, fragments)],
                "merging the microvm kernel config",
                cwd=tree,
                env={**os.environ, **dict(a.split("=", 1) for a in make_arch)},  # it reads ARCH
            )
            _make(tree, [*make_arch, "olddefconfig"], "make olddefconfig", progress, log)
            config = (tree / ".config").read_text()
            lost = missing_options(wanted, config)
            if lost:
                raise ImageError(
                    f"{real} {version} cannot have these options of {' + '.join(p.name for p in fragments)} as asked "
                    f"(unknown or dependencies unmet): {', '.join(lost)}"
                )
            _make(tree, [*make_arch, f"-j{jobs}", arch.kernel_target], "compiling the kernel", progress, log)
            release = run_tool(
                ["make", "-s", "-C", str(tree), *make_arch, "kernelrelease"], "reading the kernel release"
            ).strip()
            shutil.copyfile(tree / arch.kernel_output, dest / "kernel")
            (dest / "config").write_text(config)
            (dest / "release").write_text(release + "\n")
            (dest / "modules").mkdir()
            (dest / "modules.order").write_text("")
        progress(f"kernel {release} built")

    cached_build(final, build)
    release = (final / "release").read_text().strip()
    return KernelFiles(image=final / "kernel", release=release, identity=key, modules=())
