"""Builds container images for the tests, as skopeo/buildah and `docker save` lay them out:
an OCI image layout (index.json, blobs/sha256) and a docker-archive tar (manifest.json)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# One layer: {path: content}; content is bytes (a file), None (a directory), "->target" (a symlink).
Layer = dict[str, "bytes | str | None"]
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def layer_tar(entries: Layer, extra: Sequence[tarfile.TarInfo] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return out.getvalue()


def compress(data: bytes, media_type: str) -> bytes:
    if media_type == LAYER_GZIP:
        return gzip.compress(data, mtime=0)
    if media_type == LAYER_ZSTD:
        zstd = shutil.which("zstd")
        assert zstd, "zstd is needed to build a zstd layer"
        return subprocess.run([zstd, "-q", "-c"], input=data, capture_output=True, check=True).stdout
    return data


def config(arch: str = "amd64", env: Sequence[str] = (), workdir: str = "", user: str = "",
           diff_ids: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    return {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": list(env),
            "WorkingDir": workdir,
            "User": user,
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hello"],
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }


def _blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def oci_layout(root: Path, layers: Sequence[bytes], cfg: dict[str, Any], *, tag: str | None = "latest",
               media_type: str = LAYER_GZIP, platform: str | None = None) -> str:  # fmt: skip
    """Write (or add to) an OCI layout at ``root``; returns the manifest's digest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descriptors = []
    diff_ids = []
    for raw in layers:
        blob = compress(raw, media_type)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        descriptors.append({"mediaType": media_type, "digest": _blob(root, blob), "size": len(blob)})
    cfg = {**cfg, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_bytes = json.dumps(cfg).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _blob(root, cfg_bytes),
            "size": len(cfg_bytes),
        },
        "layers": descriptors,
    }
    m_bytes = json.dumps(manifest).encode()
    desc: dict[str, Any] = {"mediaType": manifest["mediaType"], "digest": _blob(root, m_bytes), "size": len(m_bytes)}
    if tag is not None:
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    if platform is not None:
        desc["platform"] = {"architecture": platform, "os": "linux"}
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append(desc)
    index_path.write_text(json.dumps(index))
    return str(desc["digest"])


def docker_archive(path: Path, layers: Sequence[bytes], cfg: dict[str, Any], tag: str = "test/image:latest") -> None:
    """Write a `docker save` archive (the legacy layout: <id>/layer.tar, <config digest>.json)."""
    diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
    cfg_bytes = json.dumps({**cfg, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + ".json"
    names = [f"{d[7:]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": cfg_name, "RepoTags": [tag], "Layers": names}]
    with tarfile.open(path, "w") as tar:
        for name, data in [(cfg_name, cfg_bytes), *zip(names, layers, strict=True),
                           ("manifest.json", json.dumps(manifest).encode())]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
