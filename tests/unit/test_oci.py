"""Container images as roots (pytest_microvm/image/oci.py), built in the test: layers with
whiteouts, both formats, digests, architectures, escapes; nothing booted."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from pytest_microvm import arch as arches
from pytest_microvm.errors import ImageError
from pytest_microvm.image.oci import ImageDefaults, container_root, normalize
from tests.oci_images import LAYER_GZIP, LAYER_TAR, LAYER_ZSTD, config, docker_archive, layer_tar, oci_layout

X86 = arches.get("x86_64")
BASE: dict[str, bytes | str | None] = {
    "bin": None,
    "bin/sh": b"#!shell\n",
    "etc": None,
    "etc/hidden": b"lower\n",
    "etc/kept": b"kept\n",
    "opt": None,
    "opt/app": None,
    "opt/app/old-1": b"1",
    "opt/app/old-2": b"2",
    "var": None,
    "var/link": "->/etc/kept",
}
UPPER: dict[str, bytes | str | None] = {
    "etc": None,
    "etc/.wh.hidden": b"",
    "opt/app": None,
    "opt/app/new": b"upper\n",  # before the opaque marker in the layer: a same-layer entry stays
    "opt/app/.wh..wh..opq": b"",
    "var/link": b"a file where the symlink was\n",
}
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world", "EMPTY="]


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            out[rel] = "->" + os.readlink(path) if path.is_symlink() else "dir" if path.is_dir() else path.read_text()
    return out


def _expect_layered(tree: Path) -> None:
    files = _tree(tree)
    assert "etc/hidden" not in files and files["etc/kept"] == "kept\n"  # the whiteout hid one file
    assert sorted(k for k in files if k.startswith("opt/app/")) == ["opt/app/new"]  # opaque: only the upper's
    assert files["var/link"] == "a file where the symlink was\n"
    assert not any(".wh." in k for k in files)


@pytest.mark.parametrize("media_type", [LAYER_GZIP, LAYER_ZSTD, LAYER_TAR])
def test_an_oci_layout_applies_layers_with_whiteouts(tmp_path: Path, media_type: str) -> None:
    layout = tmp_path / "layout"
    digest = oci_layout(layout, [layer_tar(BASE), layer_tar(UPPER)],
                        config(env=ENV, workdir="/opt/app", user="1000:1000"), media_type=media_type)  # fmt: skip
    root = container_root(f"oci:{layout}:latest", tmp_path / "cache", lambda m: None, X86)
    _expect_layered(root.tree)
    assert root.key == "oci-" + digest.removeprefix("sha256:")
    assert root.defaults == ImageDefaults(
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "hello world", "EMPTY": ""},
        cwd="/opt/app", user="1000:1000", entrypoint=("/bin/sh", "-c"), cmd=("echo hello",),
    )  # fmt: skip
    # Cached by the manifest digest: the second call unpacks nothing.
    said: list[str] = []
    again = container_root(f"oci:{layout}", tmp_path / "cache", said.append, X86)
    assert again.tree == root.tree and not said


def test_a_docker_save_archive_is_checked_against_its_diff_ids(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    docker_archive(archive, [layer_tar(BASE), layer_tar(UPPER)], config(env=ENV, workdir="/etc"))
    root = container_root(f"docker-archive:{archive}", tmp_path / "cache", lambda m: None, X86)
    _expect_layered(root.tree)
    assert root.defaults.cwd == "/etc" and root.defaults.env["GREETING"] == "hello world"
    # A layer whose content is not what the config's diff_id says.
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    layer_name = next(n for n in members if n.endswith("layer.tar"))
    members[layer_name] = layer_tar({**BASE, "bin/sh": b"#!tampered\n"})
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    with pytest.raises(ImageError, match=f"layer {layer_name} does not match its diff_id"):
        container_root(f"docker-archive:{bad}", tmp_path / "cache2", lambda m: None, X86)
    assert not list((tmp_path / "cache2" / "rootfs").glob("docker-*/tree"))  # nothing half-built cached


def test_tags_and_architectures_choose_the_manifest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, [layer_tar(BASE)], config(arch="arm64"), tag="v1", platform="arm64")
    oci_layout(layout, [layer_tar({**BASE, "etc/amd64": b"x"})], config(arch="amd64"), tag="v1", platform="amd64")
    oci_layout(layout, [layer_tar({**BASE, "etc/two": b"x"})], config(), tag="v2")
    cache = tmp_path / "cache"
    assert "etc/amd64" in _tree(container_root(f"oci:{layout}:v1", cache, lambda m: None, X86).tree)
    assert "etc/two" in _tree(container_root(f"oci:{layout}:v2", cache, lambda m: None, X86).tree)
    aarch = container_root(f"oci:{layout}:v1", cache, lambda m: None, arches.get("aarch64")).tree
    assert "etc/amd64" not in _tree(aarch)
    with pytest.raises(ImageError, match="no image tagged 'v3'; the layout has: v1, v2"):
        container_root(f"oci:{layout}:v3", cache, lambda m: None, X86)
    with pytest.raises(ImageError, match="the image is for arm64, not for this guest's amd64"):
        only_arm = tmp_path / "arm"
        oci_layout(only_arm, [layer_tar(BASE)], config(arch="arm64"), platform="arm64")
        container_root(f"oci:{only_arm}", cache, lambda m: None, X86)
    other = tmp_path / "other"
    oci_layout(other, [layer_tar(BASE)], config(arch="s390x"))  # no platform in the index: the config says
    with pytest.raises(ImageError, match="config is for architecture s390x, not for this guest's amd64"):
        container_root(f"oci:{other}", cache, lambda m: None, X86)


def test_a_wrong_digest_or_a_missing_blob_names_the_blob(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, [layer_tar(BASE), layer_tar(UPPER)], config())
    manifest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"].removeprefix("sha256:")
    layers = json.loads((layout / "blobs" / "sha256" / manifest).read_text())["layers"]
    second = layout / "blobs" / "sha256" / layers[1]["digest"].removeprefix("sha256:")
    second.write_bytes(second.read_bytes() + b"\0")  # tampered with
    with pytest.raises(ImageError, match=f"layer {layers[1]['digest']} does not match its content"):
        container_root(f"oci:{layout}", tmp_path / "cache", lambda m: None, X86)
    assert not [p for p in (tmp_path / "cache" / "rootfs").glob("oci-*") if p.is_dir()]  # nothing half-built cached
    second.unlink()
    with pytest.raises(ImageError, match=f"layer {layers[1]['digest']} is missing"):
        container_root(f"oci:{layout}", tmp_path / "cache", lambda m: None, X86)
    with pytest.raises(ImageError, match="is not an OCI image layout"):
        container_root(f"oci:{tmp_path}", tmp_path / "cache", lambda m: None, X86)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("upper", "extra", "why"),
    [
        ({}, [_member("../escape")], "has a '..' component"),
        ({}, [_member("/etc/abs")], "is absolute"),
        ({"evil": "->/etc"}, [_member("evil/passwd")], "beneath the symlink /evil"),
        ({}, [_member("bin/ln", tarfile.LNKTYPE, "../../etc/shadow")], "has a '..' component"),
        # A whiteout through a symlink a lower layer made: it must not delete the host's /etc.
        ({"lower:evil": "->/"}, [_member("evil/.wh.etc")], "beneath the symlink /evil"),
    ],
)
def test_a_layer_that_escapes_the_tree_is_refused(
    tmp_path: Path, upper: dict[str, bytes | str | None], extra: list[tarfile.TarInfo], why: str
) -> None:
    layout = tmp_path / "layout"
    lower = {**BASE, **{k.removeprefix("lower:"): v for k, v in upper.items() if k.startswith("lower:")}}
    upper = {k: v for k, v in upper.items() if not k.startswith("lower:")}
    oci_layout(layout, [layer_tar(lower), layer_tar(upper, extra)], config())
    with pytest.raises(ImageError, match=f"layer 2 .*refusing to unpack member .*{why}"):
        container_root(f"oci:{layout}", tmp_path / "cache", lambda m: None, X86)
    assert not [p for p in (tmp_path / "cache" / "rootfs").glob("oci-*") if p.is_dir()]
    assert not (tmp_path / "escape").exists()


def test_an_unsupported_layer_type_and_a_root_without_a_shell_are_errors(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    oci_layout(layout, [layer_tar(BASE)], config(), media_type="application/vnd.example.layer+squashfs")
    with pytest.raises(ImageError, match="layer 1 has the unsupported media type"):
        container_root(f"oci:{layout}", tmp_path / "cache", lambda m: None, X86)
    shell_less = tmp_path / "no-sh"
    oci_layout(shell_less, [layer_tar({"etc": None, "etc/x": b""})], config())
    with pytest.raises(ImageError, match="has no /bin/sh"):
        container_root(f"oci:{shell_less}", tmp_path / "cache", lambda m: None, X86)


def test_references_are_made_absolute_and_the_option_checks_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_microvm.options import BY_NAME, OptionError

    monkeypatch.chdir(tmp_path)
    assert normalize("oci:layout:v1") == f"oci:{tmp_path}/layout:v1"
    assert normalize("docker-archive:img.tar") == f"docker-archive:{tmp_path}/img.tar"
    with pytest.raises(OptionError, match="oci:/no/such: /no/such does not exist"):
        BY_NAME["rootfs"].convert("oci:/no/such")
    (tmp_path / "img.tar").write_bytes(hashlib.sha256(b"").digest())
    assert BY_NAME["rootfs"].convert(f"docker-archive:{tmp_path}/img.tar") == f"docker-archive:{tmp_path}/img.tar"
