"""Builds the guest image: PVH vmlinux + an initramfs with busybox, the agent as /init, modules.

Everything lands in the cache (:mod:`pytest_microvm.cache`) under a directory named by a
hash of its inputs, so a rebuild only happens when an input changes. Each cached step
is built in a staging directory and renamed into place under a ``filelock``: processes
building at once (xdist workers, parallel CI jobs) wait for one build, never see half of
one, and never build twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_microvm.cache import cache_dir as default_cache_dir
from pytest_microvm.cache import cached_build
from pytest_microvm.errors import ImageError
from pytest_microvm.image.cpio import CpioWriter
from pytest_microvm.image.kernel import extract_vmlinux, has_pvh_entry, is_elf
from pytest_microvm.image.kernel_build import source_kernel
from pytest_microvm.image.sources import (
    KernelFiles,
    Progress,
    agent_source_dir,
    debian_kernel,
    find_busybox,
    sha256_bytes,
    ssh_bundle,
    user_kernel,
)

# Bump when the image layout or what /init expects changes: old cache entries then stop matching.
BUILDER_VERSION = "2"
AGENT_CFLAGS = ("-static", "-O2", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
MANIFEST = "manifest.json"
KNOWN_FEATURES = frozenset({"ssh"})


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
        )


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ImageError("no C compiler found: install gcc and libc6-dev (the agent is linked statically)")
    return cc


def build_agent(cache: Path | None = None, progress: Progress = lambda _m: None) -> Path:
    """Compile the agent (static) into the cache and return the binary's path."""
    cache = cache or default_cache_dir()
    src = agent_source_dir() / "agent.c"
    cc = _compiler()
    try:
        cc_version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"the C compiler {cc} does not run: {exc}") from exc
    key = sha256_bytes(src.read_bytes() + cc_version.encode() + " ".join(AGENT_CFLAGS).encode())[:16]
    final = cache / "agent" / key

    def build(staging: Path) -> None:
        progress("compiling the guest agent")
        proc = subprocess.run(
            [cc, *AGENT_CFLAGS, "-o", str(staging / "microvm-agent"), str(src)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            hint = " (static libc missing? install libc6-dev)" if "cannot find -lc" in proc.stderr else ""
            raise ImageError(f"compiling the agent failed{hint}:\n{proc.stderr.strip()[-2000:]}")

    cached_build(final, build)
    return final / "microvm-agent"


def _agent_version(agent: Path) -> str:
    out = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def _write_initramfs(
    out: Path, agent: Path, busybox: Path, modules: tuple[Path, ...], extra_root: Path | None = None
) -> None:
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    with out.open("wb") as fh:
        w = CpioWriter(fh)
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
            w.directory(d, 0o700 if d == "root" else 0o755)
        w.directory("tmp", 0o1777)
        # The kernel opens /dev/console for init before anything is mounted.
        w.char_device("dev/console", 5, 1)
        w.char_device("dev/null", 1, 3, 0o666)
        w.file("init", agent.read_bytes(), 0o755)
        w.symlink("usr/bin/microvm-agent", "/init")  # the tool modes (--connect, --listen, --echo)
        w.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in applets:
            if applet != "bin/busybox" and not applet.startswith("linuxrc"):
                w.symlink(applet, "/bin/busybox")
        names = []
        for mod in modules:
            w.file(f"lib/modules/microvm/{mod.name}", mod.read_bytes())
            names.append(f"/lib/modules/microvm/{mod.name}")
        w.file("etc/microvm/modules", "".join(f"{n}\n" for n in names).encode())
        w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.file("etc/group", b"root:x:0:\n")
        w.file("etc/hostname", b"microvm\n")
        if extra_root is not None:  # a feature's tree (e.g. dropbear and its libraries), as it is
            made = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "lib", "var", "mnt", "root", "tmp", "dev"}
            for path in sorted(extra_root.rglob("*")):
                rel = path.relative_to(extra_root).as_posix()
                if path.is_dir():
                    if rel not in made:
                        w.directory(rel)
                else:
                    w.file(rel, path.read_bytes(), path.stat().st_mode & 0o7777)
        w.close()


def build_image(
    *,
    kernel: str | os.PathLike[str] | None = None,
    modules: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: Progress = lambda _m: None,
    features: tuple[str, ...] = (),
) -> GuestImage:
    """Build (or find in the cache) the guest image and return it.

    ``kernel``: ``"debian"`` (the default: Debian's linux-image-amd64), ``"source"`` (a
    small kernel built from Debian's linux-source with ``guest-image/kernel/microvm.config``:
    boots in about half the time, built once in a few minutes), or the path of a bzImage,
    vmlinux or kernel .deb (write ``./source`` for a file named ``source``).
    ``modules``: that kernel's ``lib/modules/<release>`` tree, if its vsock and virtio
    drivers are modules (a .deb brings its own).
    ``features``: optional extras; ``("ssh",)`` adds dropbear for ``MicroVM.ssh()``.
    """
    unknown = set(features) - KNOWN_FEATURES
    if unknown:
        raise ImageError(f"unknown image feature(s) {sorted(unknown)}; known: {sorted(KNOWN_FEATURES)}")
    root = default_cache_dir(cache)
    if kernel is None or kernel == "debian":
        kfiles: KernelFiles = debian_kernel(root, progress)
    elif kernel == "source":
        if modules:
            raise ImageError("the kernel built from source has its drivers built in: it takes no module tree")
        kfiles = source_kernel(root, progress)
    else:
        kfiles = user_kernel(Path(kernel), Path(modules) if modules else None, root, progress)
    agent = build_agent(root, progress)
    busybox = find_busybox(root, progress)
    ssh = ssh_bundle(root, progress) if "ssh" in features else None
    key = sha256_bytes(
        json.dumps(
            {
                "builder": BUILDER_VERSION,
                "agent": agent.parent.name,
                "busybox": sha256_bytes(busybox.read_bytes()),
                "kernel": kfiles.identity,
                "modules": [m.name for m in kfiles.modules],
                "features": sorted(features),
                "ssh": ssh.root.parent.name if ssh else None,
            },
            sort_keys=True,
        ).encode()
    )[:20]
    final = root / "images" / key

    def build(staging: Path) -> None:
        raw = kfiles.image.read_bytes()
        kernel_name, pvh = "bzImage", False
        if is_elf(raw):
            kernel_name, pvh, data = "vmlinux", has_pvh_entry(raw), raw
        else:
            progress("extracting the uncompressed vmlinux (PVH boot skips the in-guest decompression)")
            try:
                data = extract_vmlinux(raw)
                pvh = has_pvh_entry(data)
            except ImageError as exc:
                progress(f"cannot extract vmlinux ({exc}); the image boots the bzImage, which is slower")
            if pvh:
                kernel_name = "vmlinux"
            else:
                data = raw
        (staging / kernel_name).write_bytes(data)
        progress(f"writing the initramfs (busybox, agent, {len(kfiles.modules)} modules)")
        _write_initramfs(staging / "initramfs.cpio", agent, busybox, kfiles.modules, ssh.root if ssh else None)
        manifest = {
            "key": key,
            "kernel": kernel_name,
            "initramfs": "initramfs.cpio",
            "pvh": pvh,
            "kernel_release": kfiles.release,
            "agent_version": _agent_version(agent),
            "modules": [m.name for m in kfiles.modules],
            "features": sorted(features),
            "ssh_host_key": ssh.host_key if ssh else None,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    if cached_build(final, build):
        progress(f"built image {key}")
    return GuestImage.load(final)
