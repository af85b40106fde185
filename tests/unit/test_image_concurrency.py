"""Image builds across processes: two builders of one image build it once, and a builder
killed halfway leaves nothing that a later build would use (no VM is booted)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from pytest_microvm.image.rootfs import have_mkfs_erofs
from pytest_microvm.image.sources import find_busybox
from tests.agent_harness import reaping

pytestmark = pytest.mark.skipif(not have_mkfs_erofs(), reason="needs mkfs.erofs (apt-get install erofs-utils)")

# Builds with a stand-in kernel file (the builder only copies it) and a tiny user root,
# so the test needs no download; KILL_ON makes the process SIGKILL itself at that step.
BUILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pytest_microvm.image import build_image

    kernel, rootfs, cache, kill_on = sys.argv[1:5]

    def progress(message):
        print(message, flush=True)
        if kill_on and kill_on in message:
            os.kill(os.getpid(), signal.SIGKILL)

    image = build_image(kernel=kernel, rootfs=rootfs, cache=cache, progress=progress)
    print("RESULT " + json.dumps([str(image.directory), image.root_kind]), flush=True)
    """
)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    kernel = tmp_path / "fake-kernel"
    kernel.write_bytes(b"not really a kernel: the builder only copies it")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    busybox = find_busybox(tmp_path / "bb-cache", lambda _m: None)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    (root / "bin" / "sh").symlink_to("busybox")
    tar = tmp_path / "root.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname=".")
    return kernel, tar, tmp_path / "cache"


def _builder(kernel: Path, tar: Path, cache: Path, kill_on: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(kernel), str(tar), str(cache), kill_on],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_processes_build_the_same_image_once(inputs: tuple[Path, Path, Path]) -> None:
    kernel, tar, cache = inputs
    procs = [_builder(kernel, tar, cache) for _ in range(2)]
    with reaping(*procs):
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(line[7:]) for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2 and results[0] == results[1]
    both = "\n".join(outputs)
    assert both.count("built image") == 1
    assert both.count("into root.erofs") == 1  # the EROFS image was packed by one of them only


def test_a_build_killed_halfway_leaves_nothing_a_later_build_uses(inputs: tuple[Path, Path, Path]) -> None:
    kernel, tar, cache = inputs
    killed = _builder(kernel, tar, cache, kill_on="into root.erofs")
    with reaping(killed):
        out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, out
    images = cache / "images"
    assert not [d for d in images.iterdir() if d.is_dir() and not d.name.startswith(".")]
    again = _builder(kernel, tar, cache)
    with reaping(again):
        out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert "built image" in out  # built anew, not taken from the half-written one
    directory = Path(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])[0])
    assert (directory / "manifest.json").is_file() and (directory / "root.erofs").stat().st_size > 0
    # The dead builder's staging directory went too (it can be as large as the root).
    assert [d.name for d in images.iterdir() if d.name.startswith(".")] == []
