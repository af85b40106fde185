"""What the guest sees as files besides its initramfs: its root and the host's shares.

Owns the QEMU arguments and kernel command line for a root disk (EROFS on virtio-blk),
for the host's own ``/`` as the root (virtio-9p, read-only), and for host directory
shares (virtio-9p, built into QEMU: no daemon), and the one command that mounts the
shares once the agent is up. The agent does the guest side (docs/protocol.md, "Guest
root" and "Host directory shares"). Shares are mounted after boot, not at boot: the
kernel command line never has to carry host paths, and a share needs nothing from the
image.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_microvm.errors import ConfigError
from pytest_microvm.image import GuestImage, build_image
from pytest_microvm.image.builder import root_request
from pytest_microvm.machine.config import Share, VMConfig, is_guest_own

HOST_ROOT_TAG = "hostroot"


def _qemu_path(path: Path) -> str:
    return str(path).replace(",", ",,")  # QEMU option syntax: a literal comma is doubled


def _share_tag(index: int) -> str:
    return f"share{index}"


def image_for(config: VMConfig) -> GuestImage:
    """The image a VM boots: ``config.image``, or the one built (cached) for the config's
    packages or rootfs. A ConfigError, before anything starts, for a mismatch or for
    what the image's kernel cannot do."""
    image = config.image
    asked = root_request(config.packages, config.rootfs)
    if image is None:
        image = build_image(packages=config.packages, rootfs=config.rootfs, arch=config.arch)
    elif image.arch != config.arch:
        raise ConfigError(
            f"image {image.key} is for {image.arch} guests, and the VM is asked to be {config.arch}: "
            f"pass build_image(arch={config.arch!r}) as image=, or leave image= unset"
        )
    elif asked != ((), None) and asked != (image.packages, image.rootfs):
        raise ConfigError(
            f"image {image.key} was not built for packages={list(config.packages)} rootfs={config.rootfs!r}: "
            "pass build_image(packages=..., rootfs=...) as image=, or leave image= unset"
        )
    _check(image, config)
    return image


def _check(image: GuestImage, config: VMConfig) -> None:
    needed = modules(image, config)
    missing = [g for g in needed if g not in image.module_groups]
    if missing:
        what = {
            "9p": "9p (shares)",
            "blk": "virtio-blk and EROFS (root disk)",
            "overlay": "overlayfs",
            "vhost": "vhost-vsock (VMs inside the guest)",
        }
        raise ConfigError(
            f"kernel {image.kernel_release} lacks {', '.join(what.get(g, g) for g in missing)}: "
            "use --kernel debian or --kernel source"
        )


def modules(image: GuestImage, config: VMConfig) -> list[str]:
    """The module groups (kernel.MODULE_GROUPS) this boot needs the agent to load."""
    groups = []
    if image.root_kind == "erofs":
        groups += ["blk", "overlay"]
    if image.root_kind == "host":
        groups += ["9p", "overlay"]
    if config.shares and "9p" not in groups:
        groups.append("9p")
    return groups + [g for g in config.modules if g not in groups]


def cmdline(image: GuestImage, config: VMConfig) -> list[str]:
    args = []
    groups = modules(image, config)
    if groups:
        args.append(f"microvm.modules={','.join(groups)}")
    if image.root_kind == "erofs":
        args.append("microvm.root=erofs")
    elif image.root_kind == "host":
        args.append(f"microvm.root=9p:{HOST_ROOT_TAG}")
    return args


def qemu_args(image: GuestImage, config: VMConfig) -> list[str]:
    args: list[str] = []
    if image.root_kind == "erofs":
        assert image.root_disk is not None
        args += [
            "-drive", f"file={_qemu_path(image.root_disk)},if=none,id=rootdisk,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=rootdisk",
        ]  # fmt: skip
    if image.root_kind == "host":
        args += _fsdev(HOST_ROOT_TAG, Share(Path("/"), readonly=True))
    for i, (_guest, share) in enumerate(config.share_list()):
        args += _fsdev(_share_tag(i), share)
    return args


def _fsdev(tag: str, share: Share) -> list[str]:
    # security_model=none: files keep the host user's ownership (what the guest creates
    # belongs to whoever runs QEMU). multidevs=remap: a directory spanning several host
    # file systems gets inode numbers that do not collide in the guest.
    ro = ",readonly=on" if share.readonly else ""
    return [
        "-fsdev", f"local,id={tag},path={_qemu_path(share.host)},security_model=none,multidevs=remap{ro}",
        "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
    ]  # fmt: skip


def mount_command(config: VMConfig) -> list[str] | None:
    """The guest command that mounts every share (the agent's tool mode), or None."""
    shares = config.share_list()
    if not shares:
        return None
    argv = ["microvm-agent", "--mount-9p"]
    for i, (guest, share) in enumerate(shares):
        argv += [_share_tag(i), guest, "ro" if share.readonly else "rw"]
    return argv


def default_cwd(image: GuestImage, host_cwd: str, config: VMConfig | None = None) -> str | None:
    """Where commands start when they name no cwd: in host-userland mode the host's own
    working directory, when the guest sees the same files there (through the host root, or
    a share of it at the same path: /tmp is the guest's own, unless shared); else '/'."""
    if image.root_kind != "host":
        return None
    shared = config is not None and any(
        (host_cwd == guest or host_cwd.startswith(guest.rstrip("/") + "/"))
        and os.path.realpath(share.host) == os.path.realpath(guest)
        for guest, share in config.share_list()
    )
    if is_guest_own(host_cwd) and not shared:
        return None
    return host_cwd
