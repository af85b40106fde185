"""Container images as the guest's root, booted: an OCI image layout and a `docker save`
archive, both built here from the host's static busybox, with a whiteout, an opaque
directory, and the config's Env, WorkingDir and User applied to commands."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_microvm import MicroVM
from pytest_microvm.image.sources import find_busybox
from tests.oci_images import LAYER_GZIP, LAYER_ZSTD, config, docker_archive, layer_tar, oci_layout

APPLETS = ("sh", "cat", "ls", "id", "env", "pwd", "echo", "test")
ENV = ["PATH=/bin", "GREETING=hello from the image", "APP_MODE=test"]


def _layers() -> list[bytes]:
    cache = Path(os.environ.get("MICROVM_CACHE_DIR", Path.home() / ".cache/pytest-microvm"))
    base: dict[str, bytes | str | None] = {"bin": None, "bin/busybox": find_busybox(cache, print).read_bytes()}
    base |= {f"bin/{a}": "->busybox" for a in APPLETS}
    base |= {
        "etc": None,
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nworker:x:1000:1000::/home/worker:/bin/sh\n",
        "etc/group": b"root:x:0:\nworker:x:1000:\n",
        "etc/secret": b"whited out by the upper layer\n",
        "home": None,
        "home/worker": None,
        "srv": None,
        "srv/app": None,
        "srv/app/stale-1": b"from the base layer\n",
        "srv/app/stale-2": b"from the base layer\n",
    }
    upper: dict[str, bytes | str | None] = {
        "etc": None,
        "etc/.wh.secret": b"",
        "srv/app": None,
        "srv/app/.wh..wh..opq": b"",
        "srv/app/fresh": b"from the upper layer\n",
    }
    return [layer_tar(base), layer_tar(upper)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    layers = _layers()
    cfg = config(env=ENV, workdir="/srv/app", user="worker")
    oci_layout(root / "layout", layers, cfg, tag="1.0", media_type=LAYER_GZIP)
    oci_layout(root / "zstd", layers, cfg, media_type=LAYER_ZSTD)
    docker_archive(root / "saved.tar", layers, cfg, tag="example/app:1.0")
    return {
        "oci": f"oci:{root / 'layout'}:1.0",
        "docker-archive": f"docker-archive:{root / 'saved.tar'}",
        "zstd": f"oci:{root / 'zstd'}",
    }


@pytest.mark.parametrize("kind", ["oci", "docker-archive"])
def test_a_container_image_boots_with_its_layers_and_defaults(
    microvm_factory: Callable[..., MicroVM], images: dict[str, str], kind: str
) -> None:
    vm = microvm_factory(rootfs=images[kind])
    assert vm.run("cat /etc/secret").exit_code != 0  # the whiteout hid it
    assert vm.run("ls /srv/app").stdout == b"fresh\n"  # the opaque directory: the upper layer's only
    env = dict(line.split("=", 1) for line in vm.run("env").stdout.decode().splitlines() if "=" in line)
    assert env["GREETING"] == "hello from the image" and env["APP_MODE"] == "test"
    assert env["HOME"] == "/home/worker"  # User's home, as docker run sets it
    assert vm.run("pwd").stdout == b"/srv/app\n"  # WorkingDir
    assert vm.run("id -u").stdout == b"1000\n"  # User
    # The caller's own values win, per variable and per call.
    assert vm.run("echo $GREETING-$APP_MODE", env={"APP_MODE": "mine"}).stdout == b"hello from the image-mine\n"
    assert vm.run("pwd; id -u", cwd="/", user="root").stdout == b"/\n0\n"
    image = vm.config.image
    assert image is not None and image.defaults is not None and image.defaults.cmd == ("echo hello",)  # not run


def test_zstd_layers_unpack_the_same(microvm_factory: Callable[..., MicroVM], images: dict[str, str]) -> None:
    vm = microvm_factory(rootfs=images["zstd"])
    assert vm.run("ls /srv/app; test -e /etc/secret || echo gone").stdout == b"fresh\ngone\n"
