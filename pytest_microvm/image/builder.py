"""Builds the guest image: PVH vmlinux + an initramfs with busybox, the agent as /init, modules,
and optionally the guest's own root filesystem (distro packages or a user's root) as EROFS.

The root is a read-only EROFS image on a virtio-blk disk; the agent mounts it under a
tmpfs overlay and switches into it (docs/protocol.md, "Guest root"). Without
``mkfs.erofs`` the root is packed into the initramfs instead: it works, but the kernel
unpacks all of it into guest RAM at every boot.

Everything lands in the cache (:mod:`pytest_microvm.cache`) under a directory named by a
hash of its inputs, so a rebuild only happens when an input changes. Each cached step
is built in a staging directory and renamed into place under a ``filelock``: processes
building at once (xdist workers, parallel CI jobs) wait for one build, never see half of
one, and never build twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_microvm import _logging
from pytest_microvm import arch as arches
from pytest_microvm.cache import cache_dir as default_cache_dir
from pytest_microvm.cache import cached_build
from pytest_microvm.errors import ImageError
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.cpio import CpioWriter
from pytest_microvm.image.kernel_build import source_kernel
from pytest_microvm.image.oci import ImageDefaults, is_container, normalize
from pytest_microvm.image.sources import (
    KernelFiles,
    Progress,
    agent_source_dir,
    busybox_applets,
    debian_kernel,
    find_busybox,
    sha256_bytes,
    ssh_bundle,
    user_kernel,
)

log = _logging.logger(__name__)

# Bump when the image layout or what /init expects changes: old cache entries then stop matching.
BUILDER_VERSION = "5"  # 5: a container image root and its defaults
AGENT_CFLAGS = ("-static", "-O2", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
MANIFEST = "manifest.json"
KNOWN_FEATURES = frozenset({"ssh"})
HOST_ROOT = "host"  # rootfs="host": the host's own / over 9p, read-only, under a tmpfs overlay


@dataclass(frozen=True)
class GuestImage:
    """A built image: what QEMU boots (``kernel`` + ``initramfs``) and what went into it."""

    directory: Path
    kernel: Path
    initramfs: Path
    pvh: bool  # kernel is an ELF booted through its PVH entry (fast); else a bzImage
    kernel_release: str
    agent_version: str
    modules: tuple[str, ...]
    key: str
    features: tuple[str, ...] = ()
    ssh_host_key: str | None = None  # "ssh-ed25519 AAAA...", with the ssh feature
    # Where commands run: "initramfs" (busybox, or a root packed into the initramfs),
    # "erofs" (``root_disk`` under a tmpfs overlay) or "host" (the host's / over 9p).
    root_kind: str = "initramfs"
    root_disk: Path | None = None
    packages: tuple[str, ...] = ()  # as asked for; the resolved closure is in the manifest
    rootfs: str | None = None  # the user's root as given (directory, tar, or "host")
    # MODULE_GROUPS the kernel can do (modules listed in /etc/microvm/modules.<group>).
    module_groups: tuple[str, ...] = ()
    arch: str = "x86_64"  # the guest's architecture (arch.NAMES): QEMU's command line follows it
    # A container image root's Env, WorkingDir and User: the defaults of commands (docker run's).
    defaults: ImageDefaults | None = None

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        data = json.loads((directory / MANIFEST).read_text())
        return cls(
            directory=directory,
            kernel=directory / data["kernel"],
            initramfs=directory / data["initramfs"],
            pvh=data["pvh"],
            kernel_release=data["kernel_release"],
            agent_version=data["agent_version"],
            modules=tuple(data["modules"]),
            key=data["key"],
            features=tuple(data.get("features", ())),
            ssh_host_key=data.get("ssh_host_key"),
            root_kind=data.get("root_kind", "initramfs"),
            root_disk=directory / data["root_disk"] if data.get("root_disk") else None,
            packages=tuple(data.get("packages", ())),
            rootfs=data.get("rootfs"),
            module_groups=tuple(data.get("module_groups", ())),
            arch=data.get("arch", "x86_64"),
            defaults=ImageDefaults.from_json(data["defaults"]) if data.get("defaults") else None,
        )


def _compiler(arch: arches.Arch) -> str:
    for cc in arch.compilers():
        found = shutil.which(cc)
        if found:
            return found
    host = f" on this {arches.host_name()} host" if not arch.native else ""
    raise ImageError(
        f"no C compiler for {arch.name} guests{host}: apt-get install {arch.compiler_packages()} "
        "(the agent is linked statically)"
    )


def build_agent(
    cache: Path | None = None, progress: Progress = lambda _m: None, arch: arches.Arch | None = None
) -> Path:
    """Compile the agent (static, for ``arch``: default the host's) into the cache and
    return the binary's path."""
    cache = cache or default_cache_dir()
    arch = arch or arches.get()
    src = agent_source_dir() / "agent.c"
    cc = _compiler(arch)
    try:
        cc_version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"the C compiler {cc} does not run: {exc}") from exc
    ident = src.read_bytes() + cc_version.encode() + " ".join(AGENT_CFLAGS).encode() + arch.name.encode()
    key = sha256_bytes(ident)[:16]
    final = cache / "agent" / key

    def build(staging: Path) -> None:
        progress(f"compiling the guest agent ({arch.name})")
        proc = subprocess.run(
            [cc, *AGENT_CFLAGS, "-o", str(staging / "microvm-agent"), str(src)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            lib = "libc6-dev" if arch.native else arch.cross_packages
            hint = f" (static libc missing? install {lib})" if "cannot find -lc" in proc.stderr else ""
            raise ImageError(f"compiling the agent failed{hint}:\n{proc.stderr.strip()[-2000:]}")

    cached_build(final, build)
    return final / "microvm-agent"


def agent_version() -> str:
    """The version the agent says (AGENT_VERSION in its source): read, not run, since an
    agent for another architecture does not run here."""
    import re

    source = (agent_source_dir() / "agent.c").read_text()
    m = re.search(r'^#define AGENT_VERSION "([^"]+)"', source, re.M)
    if m is None:
        raise ImageError("agent.c defines no AGENT_VERSION")
    return m.group(1)


def _add_tree(w: CpioWriter, tree: Path) -> None:
    """Everything under ``tree`` as it is: directories, files with their modes, symlinks
    as symlinks (a root's absolute links point inside the guest, never on the host)."""
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = base / name
            rel = path.relative_to(tree).as_posix()
            if w.has(rel):
                continue
            st = path.lstat()
            if path.is_symlink():
                w.symlink(rel, os.readlink(path))
            elif path.is_dir():
                w.directory(rel, st.st_mode & 0o7777)
            elif path.is_file():
                w.file(rel, path.read_bytes(), st.st_mode & 0o7777)


def _write_initramfs(
    out: Path,
    agent: Path,
    busybox: Path | None,
    modules: tuple[Path, ...],
    groups: dict[str, tuple[Path, ...]],
    extra_root: Path | None = None,
    root_tree: Path | None = None,
    arch: arches.Arch | None = None,
) -> None:
    """The initramfs: the agent as /init, its module lists, and busybox as the userland,
    or (``root_tree``, the fallback without mkfs.erofs) a whole root as the userland."""
    with out.open("wb") as fh:
        w = CpioWriter(fh)
        if root_tree is not None:
            if (root_tree / "init").exists() or (root_tree / "init").is_symlink():
                raise ImageError(f"{root_tree} has its own /init, where the guest agent must go")
            _add_tree(w, root_tree)
        for d in (
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "dev",
            "dev/pts",
            "proc",
            "sys",
            "run",
            "root",
            "etc",
            "etc/microvm",
            "lib",
            "lib/modules",
            "lib/modules/microvm",
            "var",
            "mnt",
        ):
            if not w.has(d):
                w.directory(d, 0o700 if d == "root" else 0o755)
        if not w.has("tmp"):
            w.directory("tmp", 0o1777)
        # The kernel opens /dev/console for init before anything is mounted.
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, 0o666)
        w.file("init", agent.read_bytes(), 0o755)
        if not w.has("usr/bin/microvm-agent"):
            w.symlink("usr/bin/microvm-agent", "/init")  # the tool modes (--connect, --listen, --echo)
        if busybox is not None:
            applets = busybox_applets(busybox, arch or arches.get())
            w.file("bin/busybox", busybox.read_bytes(), 0o755)
            for applet in applets:
                if applet != "bin/busybox" and not applet.startswith("linuxrc") and not w.has(applet):
                    w.symlink(applet, "/bin/busybox")
        written: set[str] = set()

        def module_list(paths: tuple[Path, ...]) -> bytes:
            for mod in paths:
                if mod.name not in written:
                    written.add(mod.name)
                    w.file(f"lib/modules/microvm/{mod.name}", mod.read_bytes())
            return "".join(f"/lib/modules/microvm/{m.name}\n" for m in paths).encode()

        w.file("etc/microvm/modules", module_list(modules))
        for group, paths in sorted(groups.items()):
            w.file(f"etc/microvm/modules.{group}", module_list(paths))
        for name, data in (
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", b"root:x:0:\n"),
            ("etc/hostname", b"microvm\n"),
        ):
            if not w.has(name):
                w.file(name, data)
        if extra_root is not None:  # a feature's tree (e.g. dropbear and its libraries), as it is
            _add_tree(w, extra_root)
        w.close()


def root_request(
    packages: tuple[str, ...] | list[str] | str, rootfs: str | os.PathLike[str] | None
) -> tuple[tuple[str, ...], str | None]:
    """A root as asked for, in the one form the cache key, the manifest and a VM's check of
    its image all use: package names sorted and unique, a rootfs path absolute."""
    if isinstance(packages, str):  # a lone "python3" would be seven packages
        packages = (packages,)
    names = tuple(sorted({p.strip() for p in packages if p.strip()}))
    if rootfs is None or os.fspath(rootfs) == "":
        return names, None
    path = os.fspath(rootfs)
    if is_container(path):
        return names, normalize(path)
    return names, path if path == HOST_ROOT else os.path.abspath(path)


def build_image(
    *,
    kernel: str | os.PathLike[str] | None = None,
    modules: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: Progress = lambda _m: None,
    features: tuple[str, ...] = (),
    packages: tuple[str, ...] | list[str] = (),
    rootfs: str | os.PathLike[str] | None = None,
    arch: str | None = None,
) -> GuestImage:
    """Build (or find in the cache) the guest image and return it.

    ``kernel``: ``"debian"`` (the default: Debian's linux-image-amd64, or -arm64),
    ``"debian:VERSION"`` (the package linux-image-VERSION-amd64 or -arm64 of the host's apt
    sources, e.g. ``"debian:6.12"``, ``"debian:6.1.0-44"``), ``"source"`` (a
    small kernel built from Debian's linux-source with ``guest-image/kernel/microvm.config``:
    boots in about half the time, built once in a few minutes), or the path of a bzImage,
    vmlinux or kernel .deb (write ``./source`` for a file named ``source``).
    ``modules``: that kernel's ``lib/modules/<release>`` tree, if its vsock and virtio
    drivers are modules (a .deb brings its own).
    ``features``: optional extras; ``("ssh",)`` adds dropbear for ``MicroVM.ssh()``.
    ``packages``: distro packages (with their dependencies, from the host's apt) that make
    the guest's root, with busybox beneath: ``("python3", "iproute2")``.
    ``rootfs``: the guest's root instead: a directory or a tar (``docker export``,
    debootstrap, mkosi), or ``"host"`` for the host's own ``/`` (read-only over 9p).
    Either root is packed as EROFS and gets a tmpfs overlay in the guest.
    ``arch``: the guest's architecture (``"x86_64"``, ``"aarch64"``; default the host's):
    its kernel, busybox, packages and agent are that architecture's.
    """
    guest = arches.get(arch)
    unknown = set(features) - KNOWN_FEATURES
    if unknown:
        raise ImageError(f"unknown image feature(s) {sorted(unknown)}; known: {sorted(KNOWN_FEATURES)}")
    packages, rootfs = root_request(packages, rootfs)
    if packages and rootfs is not None:
        raise ImageError(
            f"packages {list(packages)} and rootfs={rootfs!r} do not combine: packages make a root of "
            "their own; put them into your rootfs instead"
        )
    if "ssh" in features and (packages or rootfs is not None):
        raise ImageError(
            "the ssh feature puts dropbear into the initramfs, which a guest with a root of its own leaves: "
            "add dropbear to packages= (or your rootfs) and run it yourself, or drop the ssh feature"
        )
    if rootfs == HOST_ROOT and not guest.native:
        raise ImageError(
            f"rootfs='host' is the host's own {arches.host_name()} userland, which a {guest.name} guest cannot run: "
            "give packages= or a rootfs of the guest's architecture"
        )
    if rootfs == HOST_ROOT:
        base = build_image(
            kernel=kernel, modules=modules, cache=cache, progress=progress, features=features, arch=guest.name
        )
        missing = {"9p", "overlay"} - set(base.module_groups)
        if missing:
            raise ImageError(f"rootfs='host' needs 9p and overlayfs, which kernel {base.kernel_release} lacks")
        return dataclasses.replace(base, root_kind="host", rootfs=HOST_ROOT)
    root = default_cache_dir(cache)
    apt = Apt(guest, root)
    if kernel is None or kernel == "debian":
        kfiles: KernelFiles = debian_kernel(root, progress, apt)
    elif isinstance(kernel, str) and kernel.startswith("debian:"):
        if modules:
            raise ImageError(f"kernel {kernel} is a Debian package, which brings its own modules: drop --modules")
        kfiles = debian_kernel(root, progress, apt, name=kernel.removeprefix("debian:"))
    elif kernel == "source":
        if modules:
            raise ImageError("the kernel built from source has its drivers built in: it takes no module tree")
        kfiles = source_kernel(root, progress, guest)
    else:
        kfiles = user_kernel(Path(kernel), Path(modules) if modules else None, root, progress)
    agent = build_agent(root, progress, guest)
    busybox = find_busybox(root, progress, apt)
    ssh = ssh_bundle(root, progress, apt) if "ssh" in features else None
    root_tree: Path | None = None
    root_key: str | None = None
    defaults: ImageDefaults | None = None
    resolved: tuple[str, ...] = ()
    # Imported here: an image without a root of its own never needs them.
    if packages:
        from pytest_microvm.image.packages import package_root

        built_root = package_root(packages, root, progress, busybox, apt)
        root_tree, root_key, resolved = built_root.tree, built_root.key, built_root.packages
    elif rootfs is not None and is_container(rootfs):
        from pytest_microvm.image.oci import container_root

        image_root = container_root(rootfs, root, progress, guest)
        root_tree, root_key, defaults = image_root.tree, image_root.key, image_root.defaults
    elif rootfs is not None:
        from pytest_microvm.image.rootfs import user_root

        given = user_root(Path(rootfs), root, progress)
        root_tree, root_key = given.tree, given.key
    root_kind = "initramfs"
    if root_tree is not None:
        from pytest_microvm.image.rootfs import have_mkfs_erofs

        root_kind = "erofs" if have_mkfs_erofs() else "initramfs"
        if root_kind == "erofs" and "blk" not in kfiles.groups:
            raise ImageError(f"kernel {kfiles.release} has no virtio-blk and EROFS drivers for a root disk")
    key = sha256_bytes(
        json.dumps(
            {
                "builder": BUILDER_VERSION,
                "arch": guest.name,
                "agent": agent.parent.name,
                "busybox": sha256_bytes(busybox.read_bytes()),
                "kernel": kfiles.identity,
                "modules": [m.name for m in kfiles.modules],
                "features": sorted(features),
                "ssh": ssh.root.parent.name if ssh else None,
                "root": root_key,
                "root_kind": root_kind,
                # The request too, not only what it resolved to: the manifest records it and
                # a VM checks its config against it, so two requests never share an entry.
                "packages": list(packages),
                "rootfs": rootfs,
            },
            sort_keys=True,
        ).encode()
    )[:20]
    final = root / "images" / key

    def build(staging: Path) -> None:
        kernel_name, data, pvh = guest.boot_kernel(kfiles.image.read_bytes(), progress)
        (staging / kernel_name).write_bytes(data)
        packed = root_tree if root_tree is not None and root_kind == "initramfs" else None
        if packed is not None:
            warning = (
                "mkfs.erofs is missing (Debian/Ubuntu: apt-get install erofs-utils): the root goes into "
                "the initramfs instead, which the kernel unpacks into guest RAM at every boot (slower, "
                "and the guest needs memory for all of it)"
            )
            log.warning(warning)
            progress("WARNING: " + warning)
        elif root_tree is not None:
            from pytest_microvm.image.rootfs import make_erofs

            make_erofs(root_tree, staging / "root.erofs", progress)
        progress(f"writing the initramfs (agent, {len(kfiles.modules)} modules)")
        _write_initramfs(
            staging / "initramfs.cpio",
            agent,
            None if packed is not None else busybox,
            kfiles.modules,
            kfiles.groups,
            ssh.root if ssh else None,
            packed,
            guest,
        )
        manifest = {
            "key": key,
            "kernel": kernel_name,
            "initramfs": "initramfs.cpio",
            "pvh": pvh,
            "kernel_release": kfiles.release,
            "agent_version": agent_version(),
            "modules": [m.name for m in kfiles.modules],
            "features": sorted(features),
            "ssh_host_key": ssh.host_key if ssh else None,
            "root_kind": root_kind,
            "root_disk": "root.erofs" if root_tree is not None and root_kind == "erofs" else None,
            "packages": list(packages),
            "packages_resolved": list(resolved),
            "rootfs": rootfs,
            "module_groups": sorted(kfiles.groups),
            "arch": guest.name,
            "defaults": defaults.to_json() if defaults is not None else None,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    if cached_build(final, build):
        progress(f"built image {key}")
    return GuestImage.load(final)
