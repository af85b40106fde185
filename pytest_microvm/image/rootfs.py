"""A root filesystem the user brings (``rootfs=``), and packing any root tree into EROFS.

The user's root is a directory or a tar archive (plain, gzip, xz, bzip2, or zstd when
Python or the ``zstd`` tool can read it): ``docker export``, debootstrap or mkosi output.

- A directory is used as it is and never modified. Its cache identity comes from a walk
  of ``lstat`` data (path, mode, owner, size, mtime, symlink target), not from contents:
  hashing a large tree on every boot would cost seconds, and a real edit changes mtime.
- A tar is unpacked once into ``cache/rootfs/<key>/tree`` (:func:`cached_build`). The key
  is the file's identity (resolved path, device, inode, size, mtime_ns, ctime_ns), not a
  content hash, for the same reason: reading a 500 MB archive on each boot is too slow, and
  any rewrite of the file (in place or by rename) changes one of those fields. ctime cannot
  be set back by ``touch``, so a file rewritten with its old mtime still misses the cache.

Unpacking is done here instead of by ``tarfile.extractall`` because the root is a foreign
one: symlinks may point anywhere (they are interpreted inside the guest, e.g. ``/bin/sh ->
/bin/busybox``), so the stdlib ``data`` filter is too strict, while the host must never be
written through them. So: members with absolute names or ``..`` components are refused;
no member is written beneath a symlink (``evil -> /etc`` then ``evil/passwd`` is refused);
hard links must name a file already unpacked inside the root; regular files are opened
with ``O_NOFOLLOW | O_EXCL``; device nodes and fifos are skipped (the guest's devtmpfs
provides ``/dev``). Modes are kept; numeric ownership only when running as root (otherwise
files belong to the user and :func:`make_erofs` marks them root-owned in the image).

:func:`resolve_in_root` follows a path the way the guest will see it, with absolute
symlink targets taken relative to the root; :mod:`.packages` uses it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from pytest_microvm.cache import cached_build
from pytest_microvm.errors import ImageError

Progress = Callable[[str], None]  # as image.sources has it (which imports this module)

# Bump when the unpacked layout changes: old cache entries then stop matching.
ROOTFS_FORMAT = "1"
# Every image gets the same UUID, so two builds of the same tree give the same bytes.
EROFS_UUID = "6d696372-6f76-4d00-8000-726f6f746673"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_SYMLINK_HOPS = 40  # as the kernel's MAXSYMLINKS


@dataclass(frozen=True)
class UserRoot:
    """The user's root, ready to pack: their directory as it is, or the cached unpack of their tar."""

    tree: Path
    key: str


def _is_root() -> bool:
    return os.geteuid() == 0


def resolve_in_root(root: Path, path: str) -> Path | None:
    """Where the guest path ``path`` lands inside ``root``, following symlinks as the guest would.

    Absolute symlink targets start again at ``root``, and ``..`` never climbs above it, so
    the answer is always inside ``root`` and nothing on the host is followed. The last
    component may be missing (the path it would have is returned); a missing or non-directory
    intermediate component, or a symlink loop, gives None.
    """
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            if todo:
                return None
            done.append(name)
            break
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        if todo and not stat.S_ISDIR(st.st_mode):
            return None
        done.append(name)
    return root.joinpath(*done)


def check_root(tree: Path) -> None:
    """Raise ImageError unless the guest would find an executable ``/bin/sh`` in ``tree``."""
    _check_root(tree, tree)


def _check_root(tree: Path, label: Path) -> None:
    """check_root, naming ``label`` (what the user gave, e.g. the tar) in the message."""
    tail = "commands run through /bin/sh -c; add a shell (busybox or dash)"
    sh = resolve_in_root(tree, "/bin/sh")
    try:
        st = os.lstat(sh) if sh is not None else None
    except OSError:
        st = None
    if st is None:
        bin_dir = resolve_in_root(tree, "/bin")  # fully resolved inside the tree: safe to look at
        link = bin_dir / "sh" if bin_dir is not None else None
        how = f" (/bin/sh -> {os.readlink(link)}, which is not in it)" if link is not None and link.is_symlink() else ""
        raise ImageError(f"rootfs {label} has no /bin/sh{how}: {tail}")
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise ImageError(f"rootfs {label} has no executable /bin/sh (it is not an executable file): {tail}")


def _walk_key(top: Path) -> str:
    """A digest of the lstat data of everything under ``top``, in a fixed order."""
    h = hashlib.sha256(f"{ROOTFS_FORMAT}\0{top}\0".encode())
    stack = [""]
    while stack:
        rel = stack.pop()
        path = top / rel if rel else top
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            hint = " (a root made as root may need root to read and pack)" if isinstance(exc, PermissionError) else ""
            raise ImageError(f"cannot read the rootfs directory {path}: {exc.strerror}{hint}") from exc
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
            h.update(
                # ctime and inode too: an edit that keeps size and mtime (cp -p, rsync -a)
                # still changes them, and touch cannot set ctime back.
                f"{sub}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
                f"\0{st.st_ino}\0{link}\n".encode(errors="surrogateescape")
            )
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)
    return h.hexdigest()[:20]


def _tar_key(path: Path) -> str:
    st = path.stat()
    ident = f"{ROOTFS_FORMAT}\0{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return "tar-" + hashlib.sha256(ident.encode(errors="surrogateescape")).hexdigest()[:20]


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """``path`` as a tar archive read front to back, through the ``zstd`` tool when Python cannot."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == ZSTD_MAGIC and "zst" not in getattr(tarfile.TarFile, "OPEN_METH", {}):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(
                f"rootfs {path} is zstd-compressed, which this Python cannot read and no `zstd` tool is "
                f"installed: decompress it first (zstd -d) or install zstd"
            )
        with subprocess.Popen([zstd, "-dcq", "--", str(path)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            try:
                with _tar_or_error(path, fileobj=proc.stdout, mode="r|") as tar:
                    yield tar
            finally:
                proc.kill()  # stop it early if the unpack failed half way
    else:
        with _tar_or_error(path, name=path, mode="r|*") as tar:
            yield tar


def _tar_or_error(path: Path, **kwargs: Any) -> tarfile.TarFile:
    try:
        return tarfile.open(**kwargs)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"rootfs {path} is neither a directory nor a tar archive ({exc})") from None


class _Unpacker:
    """Writes tar members into ``tree``, refusing everything that could escape it.

    ``layered``: the tree is built from image layers (:mod:`.oci`), each applied over the
    ones before it, where a later layer's entry replaces an earlier one of another kind
    (a file where a directory was, a directory where a symlink was) instead of being an
    error, and :meth:`remove` applies whiteouts."""

    def __init__(self, tree: Path, label: Path | str, default_mtime: int, *, layered: bool = False) -> None:
        self.tree = tree
        self.label = label
        self.layered = layered
        self.as_root = _is_root()
        self.default_mtime = default_mtime
        # Directories are never replaced by anything else, so once checked a path stays a real directory.
        self.dirs: set[str] = {""}
        self.dir_meta: dict[str, tuple[int, int, int, int]] = {}  # rel -> mode, uid, gid, mtime_ns
        self.skipped = 0

    def refuse(self, member: tarfile.TarInfo, why: str) -> ImageError:
        return ImageError(f"rootfs {self.label}: refusing to unpack member {member.name!r}: {why}")

    def forget(self, rel: str) -> None:
        """Drop what is known of ``rel`` and everything beneath it (it was removed)."""
        prefix = rel + "/"
        self.dirs = {d for d in self.dirs if d != rel and not d.startswith(prefix)}
        for d in [d for d in self.dir_meta if d == rel or d.startswith(prefix)]:
            del self.dir_meta[d]

    def _delete(self, rel: str) -> None:
        path = self.tree / rel
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            _make_writable(path)
            shutil.rmtree(path)  # never follows a symlink inside: it unlinks them
        else:
            os.unlink(path)
        self.forget(rel)

    def remove(self, member: tarfile.TarInfo, rel: str, *, children_only: bool = False) -> None:
        """A whiteout: ``rel`` (or, opaque, everything in the directory ``rel``) goes.

        Nothing beneath a symlink is touched: a whiteout under one is refused like any member."""
        parent, _, _ = rel.rpartition("/")
        target = rel if children_only else parent
        try:
            self.real_dirs(member, target, create=False)
        except ImageError:
            if not os.path.lexists(self.tree / target):
                return  # nothing lower down to hide
            raise
        if children_only:
            for entry in os.listdir(self.tree / rel if rel else self.tree):
                self._delete(f"{rel}/{entry}" if rel else entry)
        elif os.path.lexists(self.tree / rel):
            self._delete(rel)

    def clean(self, member: tarfile.TarInfo, name: str, what: str) -> str:
        if name.startswith("/"):
            raise self.refuse(member, f"its {what} is absolute")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(member, f"its {what} has a '..' component")
        return "/".join(parts)

    def real_dirs(self, member: tarfile.TarInfo, rel: str, create: bool) -> None:
        """Make sure every component of ``rel`` is a real directory, never a symlink."""
        done = ""
        for comp in rel.split("/") if rel else ():
            done = f"{done}/{comp}" if done else comp
            if done in self.dirs:
                continue
            path = self.tree / done
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise self.refuse(member, f"/{done} does not exist in the archive before it") from None
                os.mkdir(path, 0o700)
                self.dir_meta.setdefault(done, (0o755, 0, 0, self.default_mtime * 10**9))
                self.dirs.add(done)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.refuse(member, f"it lies beneath the symlink /{done} (-> {os.readlink(path)})")
            if not stat.S_ISDIR(st.st_mode):
                raise self.refuse(member, f"it lies beneath /{done}, which is not a directory")
            self.dirs.add(done)

    def make_room(self, member: tarfile.TarInfo, rel: str) -> Path:
        """The destination of a non-directory member: parents checked, an older non-directory removed."""
        parent, _, _ = rel.rpartition("/")
        self.real_dirs(member, parent, create=True)
        dest = self.tree / rel
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return dest
        if stat.S_ISDIR(st.st_mode):
            if not self.layered:
                raise self.refuse(member, f"it would replace the directory /{rel}")
            self._delete(rel)  # a layer's file where a lower layer had a directory
            return dest
        os.unlink(dest)  # a later member of the same name wins, as with tar
        return dest

    def finish_meta(self, dest: Path, member: tarfile.TarInfo) -> None:
        if self.as_root:
            os.chown(dest, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            mode = member.mode & 0o7777
            # Without root, mkfs.erofs must still read every file; in the image they are root's anyway.
            os.chmod(dest, mode if self.as_root else mode | 0o400)
        ns = _mtime_ns(member)
        os.utime(dest, ns=(ns, ns), follow_symlinks=False)

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = self.clean(member, member.name, "name")
        if member.isdir():
            if not rel:
                self.dir_meta[""] = (member.mode & 0o7777, member.uid, member.gid, _mtime_ns(member))
                return
            parent, _, _ = rel.rpartition("/")
            self.real_dirs(member, parent, create=True)
            path = self.tree / rel
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
            else:
                if not stat.S_ISDIR(st.st_mode) and self.layered:
                    os.unlink(path)  # a layer's directory where a lower layer had a file or symlink
                    os.mkdir(path, 0o700)
                elif not stat.S_ISDIR(st.st_mode):
                    raise self.refuse(
                        member,
                        f"a directory would replace the {'symlink' if stat.S_ISLNK(st.st_mode) else 'file'} /{rel}",
                    )
            self.dirs.add(rel)
            self.dir_meta[rel] = (member.mode & 0o7777, member.uid, member.gid, _mtime_ns(member))
            return
        if not rel:
            raise self.refuse(member, "it is not a directory but names the root")
        if member.isreg():
            src = tar.extractfile(member)
            dest = self.make_room(member, rel)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
            self.finish_meta(dest, member)
        elif member.issym():
            dest = self.make_room(member, rel)
            os.symlink(member.linkname, dest)  # any target: it is read inside the guest, never here
            self.finish_meta(dest, member)
        elif member.islnk():
            target_rel = self.clean(member, member.linkname, "hard link target")
            if not target_rel:
                raise self.refuse(member, "it is a hard link to the root directory")
            parent, _, _ = target_rel.rpartition("/")
            self.real_dirs(member, parent, create=False)
            target = self.tree / target_rel
            try:
                st = os.lstat(target)
            except FileNotFoundError:
                raise self.refuse(
                    member, f"its hard link target /{target_rel} is not in the archive before it"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise self.refuse(member, f"it is a hard link to the directory /{target_rel}")
            dest = self.make_room(member, rel)
            os.link(target, dest, follow_symlinks=False)
        else:  # character and block devices, fifos, anything else
            self.skipped += 1

    def finish_dirs(self) -> None:
        # Deepest first: setting a directory's mtime before its children are done would not stick,
        # and a read-only mode set early would block writing into it.
        for rel in sorted(self.dir_meta, key=lambda r: (-r.count("/") if r else 1, r)):
            mode, uid, gid, ns = self.dir_meta[rel]
            path = self.tree / rel if rel else self.tree
            if self.as_root:
                os.chown(path, uid, gid)
            os.chmod(path, mode if self.as_root else mode | 0o700)
            os.utime(path, ns=(ns, ns))


def _make_writable(top: Path) -> None:
    """Without root, a directory unpacked read-only cannot be emptied: give its owner write."""
    if _is_root():
        return
    for dirpath, dirnames, _ in os.walk(top):
        for d in (dirpath, *(os.path.join(dirpath, n) for n in dirnames)):
            st = os.lstat(d)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(d, st.st_mode | 0o700)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")  # pax keeps sub-second times as a decimal string
    if exact is not None:
        try:
            return int(Decimal(exact) * 10**9)
        except ArithmeticError:
            pass
    return int(member.mtime) * 10**9


def _unpack_tar(path: Path, tree: Path, progress: Progress) -> None:
    progress(f"unpacking rootfs {path}")
    unpacker = _Unpacker(tree, path, int(path.stat().st_mtime))
    with _open_tar(path) as tar:
        members = iter(tar)
        while True:
            member = None
            try:
                member = next(members, None)
                if member is None:
                    break
                unpacker.add(tar, member)
            except (tarfile.TarError, EOFError) as exc:
                raise ImageError(f"rootfs {path}: the tar archive is damaged or truncated ({exc})") from exc
            except OSError as exc:
                name = member.name if member is not None else "?"
                raise ImageError(f"rootfs {path}: unpacking {name!r} failed: {exc}") from exc
    if unpacker.skipped:
        progress(
            f"rootfs {path}: skipped {unpacker.skipped} device node(s), fifo(s) or other special file(s) "
            f"(the guest's devtmpfs provides /dev)"
        )
    _check_root(tree, path)  # before the directory modes: a read-only tree could not be cleaned up
    unpacker.finish_dirs()


def _looks_like_tar(path: Path) -> None:
    """Raise ImageError unless ``path`` opens as a tar archive (cheap: reads the first member)."""
    try:
        with _open_tar(path) as tar:
            next(iter(tar), None)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(f"rootfs {path} is neither a directory nor a tar archive ({exc})") from None


def user_root(rootfs: Path, cache: Path, progress: Progress) -> UserRoot:
    """The root tree for ``rootfs``: the directory itself, or a cached safe unpack of the tar."""
    path = Path(rootfs).expanduser()
    if not path.exists():
        raise ImageError(f"rootfs {rootfs} does not exist: give a root directory or a tar archive of one")
    path = path.resolve()
    if path.is_dir():
        check_root(path)
        return UserRoot(tree=path, key="dir-" + _walk_key(path))
    if not path.is_file():
        raise ImageError(f"rootfs {rootfs} is neither a directory nor a tar archive")
    key = _tar_key(path)
    final = cache / "rootfs" / key
    if not (final / "tree").is_dir():
        _looks_like_tar(path)

        def build(staging: Path) -> None:
            tree = staging / "tree"
            tree.mkdir()
            _unpack_tar(path, tree, progress)

        cached_build(final, build)
    return UserRoot(tree=final / "tree", key=key)


def _mkfs_erofs() -> str | None:
    return shutil.which("mkfs.erofs") or next(
        (p for p in ("/usr/sbin/mkfs.erofs", "/sbin/mkfs.erofs") if os.access(p, os.X_OK)), None
    )


def have_mkfs_erofs() -> bool:
    """True if ``mkfs.erofs`` (erofs-utils) is installed."""
    return _mkfs_erofs() is not None


def _newest_mtime(tree: Path) -> int:
    newest = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            newest = max(newest, int(os.lstat(os.path.join(dirpath, name)).st_mtime))
    return max(newest, int(os.lstat(tree).st_mtime))


def make_erofs(tree: Path, out: Path, progress: Progress) -> None:
    """Pack ``tree`` into the EROFS image ``out`` (lz4hc), written under a temporary name and renamed.

    Per-file mtimes are kept (Python's .pyc files are checked against them). The build time
    comes from SOURCE_DATE_EPOCH set to the newest mtime in the tree, which mkfs.erofs 1.5
    honours without clamping any file, and the UUID is fixed: the same tree gives the same
    bytes. (``-T`` would also fix the time, but it overwrites every file's mtime.)
    """
    mkfs = _mkfs_erofs()
    if mkfs is None:
        raise ImageError("mkfs.erofs is not installed: install erofs-utils")
    argv = [mkfs, "-zlz4hc", f"-U{EROFS_UUID}", "--quiet"]
    if not _is_root():
        argv.append("--all-root")  # the files are the user's on the host; in the guest they are root's
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(_newest_mtime(tree))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    progress(f"packing {tree} into {out.name} (erofs, lz4hc)")
    try:
        proc = subprocess.run([*argv, str(tmp), str(tree)], capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
            raise ImageError(f"mkfs.erofs failed ({proc.returncode}) packing {tree}: {detail}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
