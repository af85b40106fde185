"""Container images as the guest's root: ``rootfs="oci:DIR[:TAG]"`` and ``"docker-archive:FILE"``.

Owns reading the two formats users have, checking them, and turning one image into a root
tree (then packed as EROFS like any user root, by :mod:`.builder`):

- an **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/sha256/…``), as skopeo,
  buildah or ``docker buildx --output type=oci`` write it. ``TAG`` is matched against the
  ``org.opencontainers.image.ref.name`` annotation; an index may nest (an image index of
  per-platform manifests), and the manifest for the guest's architecture is taken.
- a **``docker save`` archive** (plain or compressed tar with ``manifest.json``: ``Config``,
  ``RepoTags``, ``Layers``), the form both the legacy and the OCI-flavoured Docker output have.

Every blob is checked against the sha256 that names it (index, manifest, config, each
layer as stored); a docker archive's layers are checked against the config's
``rootfs.diff_ids`` (uncompressed). Layers are applied in order with whiteouts (``.wh.NAME``
hides NAME of the layers below; ``.wh..wh..opq`` hides everything they put in its
directory, while the layer's own entries there stay) by the one safe unpacker of
:mod:`.rootfs`, which refuses members that would escape the tree. The tree is cached by the
manifest's digest (a docker archive's: its config's, the image ID), through
:func:`~pytest_microvm.cache.cached_build`, so nothing half-built is ever cached.

The image config's ``Env``, ``WorkingDir`` and ``User`` become the defaults of commands in
such a VM, as ``docker run`` applies them; ``Entrypoint`` and ``Cmd`` are recorded, not run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pytest_microvm import arch as arches
from pytest_microvm.cache import cached_build
from pytest_microvm.errors import ImageError
from pytest_microvm.image import rootfs as roots

OCI_PREFIX, DOCKER_PREFIX = "oci:", "docker-archive:"
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
Progress = roots.Progress


@dataclass(frozen=True)
class ImageDefaults:
    """What an image config says commands start with (``docker run`` applies the same)."""

    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()  # recorded, not run
    cmd: tuple[str, ...] = ()  # recorded, not run

    def to_json(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "cwd": self.cwd,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageDefaults:
        return cls(
            env=dict(data.get("env") or {}),
            cwd=data.get("cwd"),
            user=data.get("user"),
            entrypoint=tuple(data.get("entrypoint") or ()),
            cmd=tuple(data.get("cmd") or ()),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageDefaults:
        c = config.get("config") or {}
        env = {}
        for entry in c.get("Env") or ():
            name, sep, value = str(entry).partition("=")
            if name and sep:
                env[name] = value
        return cls(
            env=env,
            cwd=c.get("WorkingDir") or None,
            user=c.get("User") or None,
            entrypoint=tuple(c.get("Entrypoint") or ()),
            cmd=tuple(c.get("Cmd") or ()),
        )


@dataclass(frozen=True)
class ContainerRoot:
    """An image unpacked: its tree (cached), the key it is cached by, and its defaults."""

    tree: Path
    key: str
    defaults: ImageDefaults


def is_container(rootfs: str) -> bool:
    """Whether ``rootfs`` names a container image (``oci:…``, ``docker-archive:…``)."""
    return rootfs.startswith((OCI_PREFIX, DOCKER_PREFIX))


def normalize(rootfs: str) -> str:
    """``rootfs`` with its path made absolute (what the cache key and manifest record)."""
    if rootfs.startswith(OCI_PREFIX):
        path, sep, tag = rootfs.removeprefix(OCI_PREFIX).partition(":")
        return f"{OCI_PREFIX}{os.path.abspath(path)}{sep}{tag}"
    return DOCKER_PREFIX + os.path.abspath(rootfs.removeprefix(DOCKER_PREFIX))


def source_path(rootfs: str) -> str:
    """The file or directory a container reference names (for an existence check)."""
    if rootfs.startswith(OCI_PREFIX):
        return rootfs.removeprefix(OCI_PREFIX).partition(":")[0]
    return rootfs.removeprefix(DOCKER_PREFIX)


def container_root(rootfs: str, cache: Path, progress: Progress, arch: arches.Arch) -> ContainerRoot:
    """The root tree of the container image ``rootfs`` (cached), checked and unpacked."""
    image = _OciLayout(rootfs, arch) if rootfs.startswith(OCI_PREFIX) else _DockerArchive(rootfs)
    try:
        key, config, layers = image.resolve()
        defaults = ImageDefaults.from_config(config)
        # The unpacker's format too: a change in how layers are applied must not reuse old trees.
        final = cache / "rootfs" / f"{image.kind}-{roots.ROOTFS_FORMAT}-{key[:24]}"
        if not (final / "tree").is_dir():

            def build(staging: Path) -> None:
                tree = staging / "tree"
                tree.mkdir()
                unpacker = roots._Unpacker(tree, rootfs, 0, layered=True)
                for n, layer in enumerate(layers, 1):
                    progress(f"{rootfs}: layer {n}/{len(layers)}")
                    unpacker.label = f"{rootfs} layer {n} ({layer})"
                    with image.layer(layer, staging) as path:
                        _apply_layer(path, unpacker, unpacker.label)
                roots._check_root(tree, Path(source_path(rootfs)))
                unpacker.finish_dirs()

            cached_build(final, build)
        return ContainerRoot(tree=final / "tree", key=f"{image.kind}-{key}", defaults=defaults)
    finally:
        image.close()


# ---- the two formats ------------------------------------------------------------------


class _OciLayout:
    kind = "oci"

    def __init__(self, rootfs: str, arch: arches.Arch) -> None:
        path, _, tag = rootfs.removeprefix(OCI_PREFIX).partition(":")
        self.dir, self.tag, self.arch, self.label = Path(path), tag or None, arch, rootfs
        if not (self.dir / "oci-layout").is_file() or not (self.dir / "index.json").is_file():
            raise ImageError(f"rootfs {rootfs}: {self.dir} is not an OCI image layout (no oci-layout / index.json)")

    def close(self) -> None:
        pass

    def blob(self, digest: str, what: str) -> Path:
        m = _DIGEST.fullmatch(str(digest))
        if m is None:
            raise ImageError(f"rootfs {self.label}: {what} has the digest {digest!r}; only sha256 digests are read")
        path = self.dir / "blobs" / "sha256" / m.group(1)
        if not path.is_file():
            raise ImageError(f"rootfs {self.label}: {what} {digest} is missing (no {path})")
        actual = _sha256_file(path)
        if actual != m.group(1):
            raise ImageError(f"rootfs {self.label}: {what} {digest} does not match its content (sha256:{actual})")
        return path

    def json_blob(self, descriptor: dict[str, Any], what: str) -> dict[str, Any]:
        data = _json(self.blob(descriptor.get("digest", ""), what).read_bytes(), f"{self.label} {what}")
        if not isinstance(data, dict):
            raise ImageError(f"rootfs {self.label}: {what} {descriptor.get('digest')} is not a JSON object")
        return data

    def resolve(self) -> tuple[str, dict[str, Any], list[str]]:
        index = _json((self.dir / "index.json").read_bytes(), f"{self.label} index.json")
        found = list(index.get("manifests") or ())
        if self.tag is not None:
            tags = sorted({str((d.get("annotations") or {}).get(REF_NAME)) for d in found} - {"None"})
            found = [d for d in found if (d.get("annotations") or {}).get(REF_NAME) == self.tag]
            if not found:
                raise ImageError(
                    f"rootfs {self.label}: no image tagged {self.tag!r}; the layout has: {', '.join(tags) or 'no tags'}"
                )
        manifests = self._expand(found)
        if not manifests:
            raise ImageError(f"rootfs {self.label}: the layout lists no image manifest")
        mine = [d for d in manifests if self._platform(d) in (None, self.arch.debian)]
        if not mine:
            have = ", ".join(sorted({str(self._platform(d)) for d in manifests}))
            raise ImageError(
                f"rootfs {self.label}: the image is for {have}, not for this guest's {self.arch.debian} "
                f"({self.arch.name}): give arch= for one of those, or an image for {self.arch.debian}"
            )
        if len(mine) > 1:
            raise ImageError(
                f"rootfs {self.label}: the layout has {len(mine)} images for {self.arch.debian}: name one, oci:DIR:TAG"
            )
        descriptor = mine[0]
        manifest = self.json_blob(descriptor, "manifest")
        config = self.json_blob(manifest.get("config") or {}, "config")
        architecture = config.get("architecture")
        if architecture not in (None, self.arch.debian):
            raise ImageError(
                f"rootfs {self.label}: the image's config is for architecture {architecture}, not for this "
                f"guest's {self.arch.debian} ({self.arch.name})"
            )
        layers = list(manifest.get("layers") or ())
        for n, layer in enumerate(layers, 1):
            if layer.get("mediaType") not in LAYER_TYPES:
                raise ImageError(
                    f"rootfs {self.label}: layer {n} has the unsupported media type {layer.get('mediaType')!r}"
                )
        digest = _DIGEST.fullmatch(str(descriptor.get("digest")))
        assert digest is not None  # json_blob checked it
        return digest.group(1), config, [str(d["digest"]) for d in layers]

    def _expand(self, descriptors: list[dict[str, Any]], depth: int = 0) -> list[dict[str, Any]]:
        """Image manifests, nested indexes opened (each checked against its digest)."""
        out = []
        for d in descriptors:
            if d.get("mediaType") in INDEX_TYPES and depth < 4:
                nested = self.json_blob(d, "image index")
                out += self._expand(list(nested.get("manifests") or ()), depth + 1)
            else:
                out.append(d)
        return out

    @staticmethod
    def _platform(descriptor: dict[str, Any]) -> str | None:
        platform = descriptor.get("platform")
        return str(platform.get("architecture")) if isinstance(platform, dict) else None

    def layer(self, digest: str, staging: Path) -> _Held:
        return _Held(self.blob(digest, "layer"))


class _DockerArchive:
    kind = "docker"

    def __init__(self, rootfs: str) -> None:
        self.path, self.label = Path(rootfs.removeprefix(DOCKER_PREFIX)), rootfs
        if not self.path.is_file():
            raise ImageError(f"rootfs {rootfs}: {self.path} is not a file (a `docker save` archive)")
        try:
            self.tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 (closed by close(), after the build)
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"rootfs {rootfs}: not a tar archive ({exc})") from None
        self.diff_ids: list[str] = []
        self.order: dict[str, int] = {}

    def close(self) -> None:
        self.tar.close()

    def member(self, name: str, what: str) -> IO[bytes]:
        try:
            info = self.tar.getmember(name)
        except KeyError:
            raise ImageError(f"rootfs {self.label}: {what} {name} is missing from the archive") from None
        f = self.tar.extractfile(info) if info.isfile() else None
        if f is None:
            raise ImageError(f"rootfs {self.label}: {what} {name} is not a file in the archive")
        return f

    def resolve(self) -> tuple[str, dict[str, Any], list[str]]:
        entries = _json(self.member("manifest.json", "the index").read(), f"{self.label} manifest.json")
        if not isinstance(entries, list) or len(entries) != 1:
            tags = [t for e in entries for t in e.get("RepoTags") or ()] if isinstance(entries, list) else []
            raise ImageError(
                f"rootfs {self.label}: the archive holds {len(entries)} images ({', '.join(tags)}); "
                "save one image per archive"
            )
        entry = entries[0]
        name = str(entry.get("Config"))
        data = self.member(name, "config").read()
        actual = hashlib.sha256(data).hexdigest()
        named = _HEX.search(name)
        if named is not None and named.group(0) != actual:
            raise ImageError(f"rootfs {self.label}: config {name} does not match its content (sha256:{actual})")
        config = _json(data, f"{self.label} config")
        self.diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or ()]
        layers = [str(x) for x in entry.get("Layers") or ()]
        if len(layers) != len(self.diff_ids):
            raise ImageError(
                f"rootfs {self.label}: manifest.json lists {len(layers)} layers, the config "
                f"{len(self.diff_ids)} diff_ids"
            )
        self.order = {name: n for n, name in enumerate(layers)}
        return actual, config, layers

    def layer(self, name: str, staging: Path) -> _Held:
        """The layer copied out of the archive, checked against its diff_id (uncompressed)."""
        fd, tmp = tempfile.mkstemp(dir=staging, prefix="layer-")
        with os.fdopen(fd, "wb") as out, self.member(name, "layer") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        path = Path(tmp)
        want = self.diff_ids[self.order[name]]
        actual = "sha256:" + _uncompressed_sha256(path)
        if actual != want:
            path.unlink()
            raise ImageError(f"rootfs {self.label}: layer {name} does not match its diff_id {want} ({actual})")
        return _Held(path, remove=True)


class _Held:
    """A layer file for the length of its application (a temporary copy is removed after)."""

    def __init__(self, path: Path, remove: bool = False) -> None:
        self.path, self.remove = path, remove

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.remove:
            self.path.unlink(missing_ok=True)


# ---- layers ---------------------------------------------------------------------------


def _apply_layer(path: Path, unpacker: roots._Unpacker, label: str) -> None:
    """Whiteouts first (they hide what the layers below put there), then the layer's entries."""
    try:
        with roots._open_tar(path) as tar:
            for member in tar:
                rel = unpacker.clean(member, member.name, "name")
                parent, _, base = rel.rpartition("/")
                if base == OPAQUE:
                    unpacker.remove(member, parent, children_only=True)
                elif base.startswith(WHITEOUT):
                    unpacker.remove(member, f"{parent}/{base[len(WHITEOUT) :]}" if parent else base[len(WHITEOUT) :])
        with roots._open_tar(path) as tar:
            for member in tar:
                if member.name.rpartition("/")[2].startswith(WHITEOUT):
                    continue
                unpacker.add(tar, member)
    except (tarfile.TarError, EOFError) as exc:
        raise ImageError(f"rootfs {label}: the layer is damaged or truncated ({exc})") from exc
    except OSError as exc:
        raise ImageError(f"rootfs {label}: unpacking failed: {exc}") from exc


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _uncompressed_sha256(path: Path) -> str:
    """sha256 of the tar inside ``path`` (gzip and zstd undone; a plain tar as it is)."""
    with path.open("rb") as f:
        magic = f.read(4)
    h = hashlib.sha256()
    if magic[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 20):
                h.update(chunk)
    elif magic == roots.ZSTD_MAGIC:
        for chunk in _zstd_chunks(path):
            h.update(chunk)
    else:
        return _sha256_file(path)
    return h.hexdigest()


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise ImageError(f"{path} is zstd-compressed and no `zstd` tool is installed: install zstd")
    with subprocess.Popen([zstd, "-dcq", "--", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            yield chunk
    if proc.returncode:
        raise ImageError(f"{path}: zstd -d failed ({proc.returncode})")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"rootfs {what} is not JSON ({exc})") from None
