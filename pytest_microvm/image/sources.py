"""Where the image's ingredients come from: agent source, busybox, and the kernel.

The default kernel is the distribution's, of the guest architecture, from the host's apt
sources (:class:`KernelSource`, chosen in :func:`default_kernel_source` by what apt offers):
Debian's ``linux-image-amd64``/``-arm64`` (kernel and modules in one package), or on Ubuntu
``linux-image-virtual``, whose kernel is in ``linux-image-<ver>-generic`` and its modules in
``linux-modules-<ver>-generic`` and ``linux-modules-extra-<ver>-generic``. They are fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root, nothing installed);
another architecture's come through its own package lists (:mod:`.apt`). A user may instead give
a kernel file (bzImage, vmlinux ELF, or a kernel .deb) and a module tree, or ask for the
small kernel built from Debian's source (:mod:`.kernel_build`).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_microvm import arch as arches
from pytest_microvm.cache import cached_build, remembered
from pytest_microvm.errors import ImageError
from pytest_microvm.image.apt import HOST_LISTS, Apt
from pytest_microvm.image.kernel import GUEST_MODULES, MODULE_GROUPS, is_elf, read_module, resolve_modules

Progress = Callable[[str], None]
SOURCE_PACKAGE = "linux-source"  # its metapackage; what kernel_build builds from


def agent_source_dir() -> Path:
    """The agent's C source: shipped inside the wheel, or the repo's guest-image/ in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_guest" / "agent", here.parent / "guest-image" / "agent"):
        if (candidate / "agent.c").is_file():
            return candidate
    raise ImageError("the agent source (agent.c) is missing from this installation; reinstall pytest-microvm")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_tool(argv: Sequence[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False, env=env)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed") from None
    if proc.returncode != 0:
        raise ImageError(f"{what}: `{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


_PT_INTERP = 3


def _program_headers(path: Path) -> list[tuple[int, int, int]] | None:
    """(type, offset, size) of each program header of a 64-bit little-endian ELF file, or
    None for anything else. Reads the headers only, not the whole file."""
    with path.open("rb") as fh:
        head = fh.read(64)
        if not is_elf(head) or len(head) < 64 or head[4] != 2 or head[5] != 1:
            return None
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        return None
    headers = []
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        headers.append((p_type, p_offset, p_filesz))
    return headers


def elf_interpreter(path: Path) -> str | None:
    """The program interpreter (dynamic loader) a 64-bit ELF executable names, if any."""
    for p_type, offset, size in _program_headers(path) or ():
        if p_type == _PT_INTERP:
            with path.open("rb") as fh:
                fh.seek(offset)
                return fh.read(size).rstrip(b"\0").decode()
    return None


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    headers = _program_headers(path)
    return headers is not None and all(p_type != _PT_INTERP for p_type, _, _ in headers)


def host_apt(cache: Path) -> Apt:
    """apt for the host's own architecture."""
    return Apt(arches.get(), cache)


def apt_download(package: str, dest: Path, apt: Apt | None = None) -> Path:
    options = apt.options() if apt else []
    run_tool(["apt-get", *options, "download", package], f"downloading {package}", cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageError(f"apt-get download {package} produced no .deb")
    return debs[-1]


def _deb_version(package: str, apt: Apt | None = None) -> str:
    options = apt.options() if apt else []
    out = run_tool(["apt-cache", *options, "show", "--no-all-versions", package], f"looking up {package}")
    m = re.search(r"^Version: (\S+)", out, re.M)
    if not m:
        raise ImageError(f"apt-cache knows no version of {package}: run `apt-get update` first")
    return m.group(1)


def find_busybox(cache: Path, progress: Progress, apt: Apt | None = None) -> Path:
    """A statically linked busybox: the host's if static (for a guest of the host's own
    architecture), else Debian's busybox-static of the guest's architecture."""
    apt = apt or host_apt(cache)
    host = shutil.which("busybox")
    if apt.native and host and is_static_elf(Path(host)):
        return Path(host)
    if not shutil.which("apt-get"):
        raise ImageError("no static busybox found: install busybox-static (Debian/Ubuntu) or put one on PATH")
    apt.ensure_lists(progress)
    version = resolve_package(cache, "busybox-static", meta=False, apt=apt)[1]  # remembered: no apt-cache per boot
    name = re.sub(r"[^\w.+-]", "_", version)
    final = cache / "busybox" / (name if apt.native else f"{name}-{apt.arch.debian}")

    def build(staging: Path) -> None:
        progress(f"downloading busybox-static {version} ({apt.arch.debian})")
        deb = apt_download("busybox-static", staging, apt)
        run_tool(["dpkg-deb", "-x", str(deb), str(staging / "x")], "unpacking busybox-static")
        shutil.move(staging / "x" / "bin" / "busybox", staging / "busybox")
        shutil.rmtree(staging / "x")
        deb.unlink()

    cached_build(final, build)
    target = final / "busybox"
    return target


def busybox_applets(busybox: Path, arch: arches.Arch) -> list[str]:
    """``busybox --list-full``: run through the user-mode emulator for another architecture."""
    emulator = arch.user_emulator()
    prefix: list[str] = []
    if emulator is not None:
        found = shutil.which(emulator)
        if found is None:
            raise ImageError(
                f"a {arch.name} image lists its busybox's applets with {emulator}, which is not installed: "
                "apt-get install qemu-user-static"
            )
        prefix = [found]
    argv = [*prefix, str(busybox), "--list-full"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


@dataclass(frozen=True)
class KernelFiles:
    """A kernel ready for the builder: its image file, release, and modules to load in order."""

    image: Path  # bzImage or vmlinux
    release: str
    identity: str  # what the image cache key uses to tell kernels apart
    modules: tuple[Path, ...]
    # MODULE_GROUPS this kernel can do, each with the modules to load for it (empty when
    # built in); a group missing here cannot be used with this kernel.
    groups: dict[str, tuple[Path, ...]] = field(default_factory=lambda: {g: () for g in MODULE_GROUPS})


def _modules_key() -> str:
    """Part of every kernel cache key: a different module list is a different entry."""
    groups = " ".join(f"{g}:{','.join(m)}" for g, m in sorted(MODULE_GROUPS.items()))
    return hashlib.sha256((" ".join(GUEST_MODULES) + "|" + groups).encode()).hexdigest()[:8]


def _collect(kernel: Path, moddir: Path | None, dest: Path, release: str) -> None:
    """Copy the kernel and the vsock modules (with dependencies) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kernel, dest / "kernel")
    (dest / "release").write_text(release + "\n")
    mods = dest / "modules"
    mods.mkdir()
    order: list[str] = []

    def copy(paths: list[Path]) -> list[str]:
        names = []
        for path in paths:
            name = path.name.split(".ko")[0] + ".ko"
            if not (mods / name).exists():
                (mods / name).write_bytes(read_module(path))
            names.append(name)
        return names

    if moddir is not None:
        order = copy(resolve_modules(moddir, GUEST_MODULES))
    (dest / "modules.order").write_text("".join(f"{n}\n" for n in order))
    for group, wanted in MODULE_GROUPS.items():
        if moddir is None:  # a kernel without a module tree has what it has built in
            names: list[str] = []
        else:
            try:
                names = [n for n in copy(resolve_modules(moddir, wanted)) if n not in order]
            except ImageError:
                continue  # this kernel cannot do it: the group's file is absent
        (dest / f"modules.{group}.order").write_text("".join(f"{n}\n" for n in names))


def _load_collected(dest: Path, identity: str) -> KernelFiles:
    order = (dest / "modules.order").read_text().split()
    groups = {
        group: tuple(dest / "modules" / n for n in (dest / f"modules.{group}.order").read_text().split())
        for group in MODULE_GROUPS
        if (dest / f"modules.{group}.order").is_file()
    }
    return KernelFiles(
        image=dest / "kernel",
        release=(dest / "release").read_text().strip(),
        identity=identity,
        modules=tuple(dest / "modules" / n for n in order),
        groups=groups,
    )


def _from_deb(deb: Path, dest: Path, progress: Progress) -> None:
    _from_debs([deb], dest, progress)


def _from_debs(debs: list[Path], dest: Path, progress: Progress) -> None:
    """Unpack a kernel package (the first) and its module packages into one tree; collect."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp) / "x"
        for deb in debs:
            progress(f"unpacking {deb.name}")
            run_tool(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError(f"{debs[0].name} holds no /boot/vmlinuz-*: not a kernel package")
        release = kernels[0].name.removeprefix("vmlinuz-")
        moddirs = [
            d for d in (root / "lib" / "modules" / release, root / "usr" / "lib" / "modules" / release) if d.is_dir()
        ]
        _collect(kernels[0], moddirs[0] if moddirs else None, dest, release)


APT_LISTS = HOST_LISTS


def resolve_package(
    cache: Path, package: str, *, meta: bool = True, provider: str = "linux-image-", apt: Apt | None = None
) -> tuple[str, str]:
    """(real package, version): for a metapackage (``meta``), of the package it depends on.

    ``provider`` is how the real package's name starts (``linux-image-amd64`` depends on
    ``linux-image-6.1.0-N-amd64``, ``linux-source`` on ``linux-source-6.1``).

    Asking apt-cache costs about two seconds, paid on every boot if done each time; the
    answer only changes when `apt-get update` rewrites the package lists, so it is
    remembered per stamp of those lists.
    """
    apt = apt or host_apt(cache)
    lists = apt.stamp()
    stamp = f"{package}|{lists}" if lists else None

    def ask() -> list[str]:
        real = package
        if meta:
            # linux-image-amd64 is a metapackage; the kernel is in the package it depends on.
            deps = run_tool(["apt-cache", *apt.options(), "depends", package], f"looking up {package}")
            m = re.search(rf"Depends: ({re.escape(provider)}\S+)", deps)
            real = m.group(1) if m else package
        return [real, _deb_version(real, apt)]

    real, version = remembered(apt.memo / f"{package}.json", stamp, ask)
    return str(real), str(version)


class KernelSource:
    """A distribution's default kernel: its metapackage, and the packages that make it up."""

    name = "Debian"

    def __init__(self, arch: arches.Arch) -> None:
        self.arch = arch

    @property
    def meta(self) -> str:
        return self.arch.kernel_package  # linux-image-amd64: the kernel and its modules in one package

    def packages(self, real: str, offered: Callable[[str], bool]) -> list[str]:
        """Every package to unpack for the kernel package ``real`` (it first)."""
        return [real]


class UbuntuKernelSource(KernelSource):
    """Ubuntu: the kernel in linux-image-<ver>-generic, its modules in two more packages
    (the extra ones hold 9p, among others; both are unpacked, once per kernel version)."""

    name = "Ubuntu"

    @property
    def meta(self) -> str:
        return "linux-image-virtual"  # the flavour for VMs; the same name on amd64 and arm64

    def packages(self, real: str, offered: Callable[[str], bool]) -> list[str]:
        version = real.removeprefix("linux-image-").removeprefix("unsigned-")
        extra = [f"linux-modules-{version}", f"linux-modules-extra-{version}"]
        return [real, *(p for p in extra if offered(p))]


KERNEL_SOURCES: tuple[type[KernelSource], ...] = (KernelSource, UbuntuKernelSource)


def _offered(package: str, apt: Apt) -> bool:
    try:
        _deb_version(package, apt)
    except ImageError:
        return False
    return True


def default_kernel_source(cache: Path, apt: Apt) -> KernelSource:
    """The first distribution whose kernel metapackage the host's apt sources offer, asked
    once per stamp of the package lists. ImageError naming each if none is."""
    sources = [cls(apt.arch) for cls in KERNEL_SOURCES]
    lists = apt.stamp()

    def ask() -> str | None:
        return next((s.name for s in sources if _offered(s.meta, apt)), None)

    name = remembered(apt.memo / "default-kernel.json", f"default|{lists}" if lists else None, ask)
    for source in sources:
        if source.name == name:
            return source
    wanted = " nor ".join(f"{s.name}'s {s.meta}" for s in sources)
    raise ImageError(
        f"the host's apt sources offer neither {wanted}: run `apt-get update` if the package lists are "
        "empty, or use --kernel source (built from Debian's linux-source) or --kernel PATH"
    )


def apt_kernel_package(version: str, arch: arches.Arch) -> str:
    """The package ``debian:VERSION`` names: ``linux-image-VERSION-amd64`` (or -arm64)."""
    return f"linux-image-{version}-{arch.debian}"


def offered_kernels(apt: Apt) -> list[str]:
    """The VERSIONs ``debian:VERSION`` can name: the host's apt sources' linux-image-VERSION-<arch>
    packages (signed or not; debug symbols are not kernels)."""
    out = run_tool(["apt-cache", *apt.options(), "pkgnames", "linux-image-"], "listing the kernel packages")
    suffix = f"-{apt.arch.debian}"
    names = {n[len("linux-image-") : -len(suffix)] for n in out.split() if n.endswith(suffix)}
    names.discard("")  # linux-image-amd64 itself: plain `debian`
    return sorted(names, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)])


def debian_kernel(cache: Path, progress: Progress, apt: Apt | None = None, name: str | None = None) -> KernelFiles:
    """Debian's kernel package of ``apt``'s architecture (``name``: the VERSION ``debian:VERSION``
    names, else the default metapackage's), downloaded and unpacked into the cache once per version."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ImageError("no apt-get/dpkg-deb on this host to fetch Debian's kernel: pass a kernel with --kernel PATH")
    apt = apt or host_apt(cache)
    apt.ensure_lists(progress)
    source = default_kernel_source(cache, apt) if name is None else KernelSource(apt.arch)
    package = source.meta if name is None else apt_kernel_package(name, apt.arch)
    try:
        real, version = resolve_package(cache, package, apt=apt)
    except ImageError:
        if name is None:
            raise
        offered = offered_kernels(apt)
        raise ImageError(
            f"kernel debian:{name}: the host's apt sources have no {package}; they offer debian:VERSION for "
            f"VERSION in: {', '.join(offered) or 'none'}"
        ) from None
    key = re.sub(r"[^\w.+-]", "_", f"{real}_{version}") + "-" + _modules_key()

    def build(dest: Path) -> None:
        packages = source.packages(real, lambda p: _offered(p, apt))
        progress(f"downloading {', '.join(packages)} {version}")
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            _from_debs([apt_download(p, Path(tmp), apt) for p in packages], dest, progress)

    final = cache / "kernels" / key
    cached_build(final, build)
    return _load_collected(final, key)


def user_kernel(path: Path, moddir: Path | None, cache: Path, progress: Progress) -> KernelFiles:
    """A kernel the user gave: a .deb, or a bzImage/vmlinux with an optional module tree."""
    if not path.is_file():
        raise ImageError(f"kernel {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if moddir is not None:
        if not (moddir / "kernel").is_dir():
            raise ImageError(f"{moddir} has no kernel/ directory: pass lib/modules/<release> of this kernel")
        digest += "-" + hashlib.sha256(str(moddir.resolve()).encode()).hexdigest()[:8]
    key = f"user-{digest}-{_modules_key()}"

    def build(dest: Path) -> None:
        if path.suffix == ".deb":
            _from_deb(path, dest, progress)
        else:
            release = moddir.name if moddir is not None else path.name
            _collect(path, moddir, dest, release)

    final = cache / "kernels" / key
    cached_build(final, build)
    return _load_collected(final, key)


def describe_kernel(kernel: str | None, cache: Path, arch: arches.Arch | None = None) -> str:
    """One line naming the kernel a build would use, without building (for the pytest header)."""
    apt = Apt(arch or arches.get(), cache)
    if kernel == "source":
        try:
            real, version = resolve_package(cache, SOURCE_PACKAGE, provider="linux-source-")
        except ImageError as exc:
            return f"built from source: unknown ({exc})"
        cross = "" if apt.native else f", cross-built for {apt.arch.name}"
        return f"built from Debian's {real} {version} with microvm.config{cross}"
    distro, package = "Debian", apt.arch.kernel_package
    if kernel is not None and kernel.startswith("debian:"):
        package = apt_kernel_package(kernel.removeprefix("debian:"), apt.arch)
    elif kernel is not None and kernel != "debian":
        return f"{kernel} (given)"
    if not shutil.which("apt-cache"):
        return "none: no apt-cache to find the distribution's kernel; pass --microvm-kernel"
    if not apt.has_lists():
        return f"Debian's {package} (its package lists are fetched at the first build)"
    try:
        if kernel in (None, "debian"):
            source = default_kernel_source(cache, apt)
            distro, package = source.name, source.meta
        real, version = resolve_package(cache, package, apt=apt)
    except ImageError as exc:
        return f"unknown ({exc})"
    return f"{real.removeprefix('linux-image-')} ({distro} {real} {version})"


# dropbear, its SFTP server, and the libraries they link (dropbear-bin's and libtomcrypt1's
# Depends), all from the guest architecture's apt: nothing of the host's goes in.
SSH_PACKAGES = ("dropbear-bin", "libtomcrypt1", "libtommath1", "openssh-sftp-server")
SSH_LIBRARY_PACKAGES = ("libc6", "libcrypt1", "zlib1g", "libgmp10")
SSH_HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"
_PT_LOAD, _PT_DYNAMIC, _DT_NEEDED, _DT_STRTAB = 1, 2, 1, 5


def elf_needed(path: Path) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF file (any architecture): what
    ``ldd`` would list, read without running it."""
    data = path.read_bytes()
    if not is_elf(data) or data[4] != 2 or data[5] != 1:
        raise ImageError(f"{path.name} is not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _flags, offset, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return []  # static
    entries = [struct.unpack_from("<qQ", data, dynamic[0] + at) for at in range(0, dynamic[1], 16)]
    strtab = next((value for tag, value in entries if tag == _DT_STRTAB), None)
    base = next((off + strtab - va for va, off, size in loads if strtab is not None and va <= strtab < va + size), None)
    if base is None:
        raise ImageError(f"{path.name}: its dynamic string table is outside its loaded segments")
    names = []
    for tag, value in entries:
        if tag == _DT_NEEDED:
            end = data.index(b"\0", base + value)
            names.append(data[base + value : end].decode())
    return names


def _inside(tree: Path, path: str) -> Path | None:
    """``path`` (absolute, in the guest's terms) as a file in ``tree``, symlinks followed as
    the guest would, never out of ``tree``; None if it is not a file there."""
    from pytest_microvm.image.rootfs import resolve_in_root  # (rootfs imports this module)

    found = resolve_in_root(tree, path)
    return found if found is not None and found.is_file() else None


def library_closure(tree: Path, programs: list[str]) -> dict[str, Path]:
    """{guest path: file in ``tree``} of ``programs`` (guest paths), their loader and every
    library they need, found in the multiarch and plain library directories of ``tree``."""
    dirs = [f"/{d}" for pattern in ("lib/*-linux-gnu", "usr/lib/*-linux-gnu") for d in
            sorted(p.relative_to(tree).as_posix() for p in tree.glob(pattern))] + ["/lib", "/usr/lib"]  # fmt: skip
    files: dict[str, Path] = {}
    todo = list(programs)
    while todo:
        guest = todo.pop()
        if guest in files:
            continue
        found = _inside(tree, guest)
        if found is None:
            raise ImageError(f"{guest} is not in the packages unpacked for it")
        files[guest] = found
        interp = elf_interpreter(found)
        if interp:
            todo.append(interp)
        for soname in elf_needed(found):
            where = next((f"{d}/{soname}" for d in dirs if _inside(tree, f"{d}/{soname}") is not None), None)
            if where is None:
                raise ImageError(f"{Path(guest).name} needs {soname}, which none of its packages brings")
            todo.append(where)
    return files


@dataclass(frozen=True)
class SshBundle:
    """dropbear and the shared libraries it needs, laid out as they go into the guest."""

    root: Path  # a tree to copy into the initramfs as it is
    host_key: str  # the public host key ("ssh-ed25519 AAAA..."), for the client to verify


def ssh_bundle(cache: Path, progress: Progress, apt: Apt | None = None) -> SshBundle:
    """Debian's dropbear (dynamically linked) with its libraries, of the guest's
    architecture, and a generated host key."""
    apt = apt or host_apt(cache)
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise ImageError("the ssh image feature needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch dropbear")
    apt.ensure_lists(progress)
    packages = SSH_PACKAGES + SSH_LIBRARY_PACKAGES
    versions = [resolve_package(cache, pkg, meta=False, apt=apt)[1] for pkg in packages]
    key = hashlib.sha256(" ".join([*versions, apt.arch.debian]).encode()).hexdigest()[:16]
    final = cache / "ssh" / key

    def build(staging: Path) -> None:
        progress(f"downloading dropbear {versions[0]} and its libraries ({apt.arch.debian})")
        unpacked = staging / "x"
        for pkg in packages:
            run_tool(["dpkg-deb", "-x", str(apt_download(pkg, staging, apt)), str(unpacked)], f"unpacking {pkg}")
        # Debian's dropbear runs /usr/lib/sftp-server for SFTP sessions.
        files = library_closure(unpacked, ["/usr/sbin/dropbear", "/usr/lib/openssh/sftp-server"])
        files["/usr/lib/sftp-server"] = files.pop("/usr/lib/openssh/sftp-server")
        root = staging / "root"
        for guest, src in files.items():
            dest = root / guest.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            dest.chmod(0o755)
        key_file = root / SSH_HOST_KEY.lstrip("/")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        # dropbearkey of the guest's architecture, with the guest's libraries (through the
        # user-mode emulator for another architecture): the host's may not be installed.
        emulator = apt.arch.user_emulator()
        prefix = [shutil.which(emulator) or emulator, "-L", str(unpacked)] if emulator else []
        loader = library_closure(unpacked, ["/usr/bin/dropbearkey"])
        interp = elf_interpreter(unpacked / "usr/bin/dropbearkey") or ""
        libdirs = ":".join(sorted({str(p.parent) for g, p in loader.items() if g != interp}))
        argv = [*prefix, str(loader[interp]), "--library-path", libdirs, str(unpacked / "usr/bin/dropbearkey")]
        try:
            proc = subprocess.run([*argv, "-t", "ed25519", "-f", str(key_file)], capture_output=True, text=True)
        except FileNotFoundError:
            raise ImageError(f"making the guest's host key needs {argv[0]}: apt-get install qemu-user-static") from None
        if proc.returncode != 0:
            raise ImageError(f"dropbearkey failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        pub = next(line for line in proc.stdout.splitlines() if line.startswith("ssh-ed25519 "))
        (staging / "host_key.pub").write_text(" ".join(pub.split()[:2]) + "\n")
        shutil.rmtree(unpacked)
        for deb in staging.glob("*.deb"):
            deb.unlink()

    cached_build(final, build)
    return SshBundle(final / "root", (final / "host_key.pub").read_text().strip())
