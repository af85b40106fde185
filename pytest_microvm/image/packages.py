"""A guest root built from Debian packages (``packages=``), with the host's own apt, without root.

What this module owns, in order:

1. **Resolving** the dependency closure with ``apt-get --print-uris install`` against an
   *empty* dpkg status (so the host's installed packages do not count) and the host's
   package lists, plus ``dash`` alone (without dpkg and debianutils, which only its
   maintainer scripts use) unless the closure has it: busybox's static ash, were it
   /bin/sh, would run its own applets instead of the packages' commands in every ``sh -c``
   string (``ip`` would be busybox's, not iproute2's). The answer is remembered in
   ``cache/apt/closure-*.json`` per requested set, stamp of ``/var/lib/apt/lists/*Packages*``
   (names, sizes, mtimes), apt's preference files and the machine: a warm lookup asks apt
   nothing.
2. **Downloading** exactly the resolved versions with ``apt-get download NAME:ARCH=VERSION``
   into the shared ``cache/debs``, under a lock. apt checks each .deb against the hashes of
   the signed indexes (unauthenticated packages are refused); afterwards each file's size
   and the hash ``--print-uris`` reported are checked again here, since apt trusts a file
   already in the archive if only its size matches.
3. **Unpacking** every .deb with ``dpkg-deb -R`` (the file tree like ``-x``, plus the
   control files, in one call) into its own directory, then moving it into the root in
   package-name order (base-files first: it owns the root's layout). Moving never writes
   through a symlink that points out of the root: a directory reached through a symlink
   (a merged-/usr ``bin -> usr/bin``) is followed inside the root. The root keeps the split
   /usr layout the packages ship (bookworm's libc6 has /lib64/ld-linux-x86-64.so.2).
4. **Fix-ups**, since no maintainer script runs (each is deterministic):

   a. ``/etc``: passwd and group get root, daemon, bin, sys and nobody/nogroup where missing
      (existing lines are kept), /etc/hosts names localhost for 127.0.0.1 and ::1,
      nsswitch.conf and ld.so.conf are written if missing, /etc/hostname is "microvm".
   b. The update-alternatives links a postinst would make: each ``update-alternatives
      --install LINK NAME PATH PRIO [--slave LINK NAME PATH]...`` found in a postinst
      (lines using shell variables are skipped) makes LINK -> /etc/alternatives/NAME ->
      PATH for the highest-priority PATH the root has, unless a package ships LINK itself.
   c. busybox beneath: the given static busybox goes to /bin/busybox if that is free, and
      each applet of ``busybox --list-full`` gets a link to it unless the root already has
      that path, or a command of that name in /bin, /sbin, /usr/bin or /usr/sbin (a
      package's own tool always wins, whatever PATH order). /bin/sh is always made if
      missing. So ``sh``, ``cat``, ``tail``, ``stat``, ``mount`` always exist.
   d. Mount points: /dev, /proc, /sys, /run, /tmp (1777), /root (0700), /mnt, since the
      packed root is read-only.
   e. ``ldconfig -r`` (the host's; under ``unshare -r`` without root, as it chroots) writes
      /etc/ld.so.cache. Without it Debian's loader still finds the multiarch directories.
   f. Python bytecode: for each /usr/bin/python3.X, the guest's own interpreter, started
      through the guest's own loader with the guest's libraries, compiles the regular .py
      files of /usr/lib/python3.X and /usr/lib/python3/dist-packages with guest paths in
      the .pyc and timestamp checks (package mtimes are kept, and EROFS keeps them). Under
      TCG a first ``python3 -c pass`` takes 2.5 s without .pyc and 0.7 s with. Skipped with
      a warning if the interpreter cannot run on this host.
   g. Every mtime newer than the newest packaged file is set to it, so what the fix-ups
      wrote does not differ between two builds.

The tree lives in ``cache/roots/<key>/tree`` (:func:`cached_build`: a killed build leaves
nothing that is used later, and concurrent processes build it once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from pytest_microvm import arch as arches
from pytest_microvm.arch import Arch
from pytest_microvm.cache import cached_build, remembered
from pytest_microvm.errors import ImageError
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.rootfs import resolve_in_root
from pytest_microvm.image.sources import Progress, busybox_applets, elf_interpreter, host_apt

# Bump when the layout of the unpacked root or a fix-up changes: old cache entries then stop matching.
ROOTFS_VERSION = "2"
APT_PREFERENCES = Path("/etc/apt")
# A Debian package name, optionally with :arch and =version or /release (what `apt-get install` takes).
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?([=/][A-Za-z0-9.+~:_-]+)?")
_URI_LINE = re.compile(r"^'([^']+)' (\S+) (\d+) (\S*)$")
_HASHES = {"MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
BIN_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin")
SHELL_PACKAGE = "dash"  # /bin/sh: busybox's static ash runs its own applets before any package's command
ALWAYS = frozenset({"bin/sh"})  # run by absolute path (the agent's `sh -c`): made even if a `sh` is elsewhere


@dataclass(frozen=True)
class PackageRoot:
    """An unpacked root of Debian packages, ready to pack (read-only from now on)."""

    tree: Path
    key: str  # identity for the image cache key: changes when any resolved package version changes
    packages: tuple[str, ...]  # "name=version" of every package in the closure, sorted
    size: int  # bytes unpacked (regular files)


@dataclass(frozen=True)
class _Deb:
    """One package of the closure, as ``apt-get --print-uris`` names it."""

    name: str
    version: str
    arch: str
    filename: str  # its name in the apt archive directory
    size: int
    hash: str  # "SHA256:..." or "MD5Sum:...", what apt printed; may be empty

    @property
    def spec(self) -> str:
        """This exact package, as `apt-get download` takes it."""
        return f"{self.name}={self.version}" if self.arch == "all" else f"{self.name}:{self.arch}={self.version}"


def _is_root() -> bool:
    return os.geteuid() == 0


def _need_tools() -> None:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"packages= needs apt-get and dpkg-deb (Debian/Ubuntu), and this host has no {' or '.join(missing)}: "
            f"give rootfs= instead (a root directory, or a tar of one such as `docker export` output)"
        )


def _check_names(packages: Sequence[str]) -> list[str]:
    if isinstance(packages, str):
        packages = [packages]
    if not packages:
        raise ImageError("packages= names no package")
    for name in packages:
        if not _PACKAGE.fullmatch(name):
            raise ImageError(f"{name!r} is not a Debian package name (like 'python3' or 'iproute2')")
    return sorted(set(packages))


def _stamp(request: list[str], apt: Apt) -> str | None:
    """What a remembered closure depends on; None when there are no lists (nothing to remember)."""
    lists = sorted(apt.lists.glob("*Packages*"))
    if not lists:
        return None
    prefs = sorted([*APT_PREFERENCES.glob("preferences"), *APT_PREFERENCES.glob("preferences.d/*")])
    parts = [" ".join(request), platform.machine(), apt.arch.debian, ROOTFS_VERSION]
    for path in (*lists, *prefs):
        try:
            st = path.stat()
        except OSError:  # `apt-get update` is replacing it right now: ask apt itself
            return None
        parts.append(f"{path}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def _apt_argv(status: Path, archives: Path, apt: Apt) -> list[str]:
    argv = [
        "apt-get",
        "-qq",
        *apt.options(),  # another architecture's lists (image/apt.py)
        "-o", f"Dir::State::status={status}",  # empty: nothing counts as installed
        "-o", f"Dir::Cache::archives={archives}",
        "-o", "Dir::Cache::pkgcache=",  # never overwrite the host's cache with one built for our empty status
        "-o", "Debug::NoLocking=1",  # the host's dpkg lock is not ours to take (and needs root)
        "-o", "APT::Install-Recommends=false",
        "-o", "APT::Get::AllowUnauthenticated=false",  # whatever the host's apt.conf says
    ]  # fmt: skip
    if _is_root() and apt.native:  # (the options say it for another architecture)
        argv += ["-o", "APT::Sandbox::User=root"]  # _apt could not write into the user's cache
    return argv


def _run_apt(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}  # messages we can parse
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False)


def _errors(stderr: str) -> list[str]:
    return [line[3:].strip() for line in stderr.splitlines() if line.startswith("E: ")] or [stderr.strip()[-800:]]


def _parse_uris(stdout: str) -> list[_Deb]:
    debs = []
    for line in stdout.splitlines():
        m = _URI_LINE.match(line)
        if m is None:
            continue
        filename = m.group(2)
        parts = filename.removesuffix(".deb").split("_")
        if len(parts) != 3:
            raise ImageError(f"apt-get printed a package file name this cannot read: {filename}")
        name, version, arch = parts[0], urllib.parse.unquote(parts[1]), parts[2]
        debs.append(_Deb(name, version, arch, filename, int(m.group(3)), m.group(4)))
    return sorted(debs, key=lambda d: d.name)


def _resolve(request: list[str], progress: Progress, apt: Apt) -> list[_Deb]:
    progress(f"resolving the packages {' '.join(request)} ({apt.arch.debian}) with apt-get")
    with tempfile.TemporaryDirectory(prefix="microvm-apt-") as tmp:
        status = Path(tmp) / "status"
        status.touch()
        # An empty archive directory: --print-uris leaves out what is already downloaded.
        argv = _apt_argv(status, Path(tmp) / "archives", apt)
        with ThreadPoolExecutor(2) as pool:  # the shell's lookup runs alongside: it is needed nearly always
            shell_lookup = pool.submit(_run_apt, [*argv, "--print-uris", "download", SHELL_PACKAGE], Path(tmp))
            proc = _run_apt([*argv, "--print-uris", "install", "-y", *request])
            shell = shell_lookup.result()
    if proc.returncode != 0:
        raise _resolve_error(request, proc.stderr, apt)
    debs = _parse_uris(proc.stdout)
    if not debs:
        raise ImageError(f"apt-get resolved {' '.join(request)} to no package to download: {proc.stdout[-400:]}")
    if SHELL_PACKAGE not in {d.name for d in debs}:
        # Alone, without the dependencies only its maintainer scripts use (dpkg, debianutils).
        found = _parse_uris(shell.stdout) if shell.returncode == 0 else []
        if found:
            debs = sorted([*debs, *found], key=lambda d: d.name)
        else:
            progress(f"warning: apt knows no {SHELL_PACKAGE}: /bin/sh will be busybox's, whose applets then win")
    return debs


def _resolve_error(request: list[str], stderr: str, apt: Apt) -> ImageError:
    errors = _errors(stderr)
    unknown = [m.group(1) for e in errors if (m := re.match(r"Unable to locate package (\S+)", e))]
    hint = "" if any(apt.lists.glob("*Packages*")) else " (this host has no package lists: run `apt-get update`)"
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        return ImageError(
            f"unknown package{'s' if len(unknown) > 1 else ''} {names} (apt-get: {'; '.join(errors)}){hint}; "
            f"nothing was cached"
        )
    return ImageError(f"apt-get cannot resolve {' '.join(request)}: {'; '.join(errors)}{hint}; nothing was cached")


def _closure(request: list[str], cache: Path, progress: Progress, apt: Apt) -> list[_Deb]:
    """The packages to unpack: remembered per stamp of the apt lists, else asked of apt-get."""
    memo = apt.memo / f"closure-{hashlib.sha256(' '.join(request).encode()).hexdigest()[:16]}.json"

    def ask() -> list[dict[str, object]]:
        _need_tools()
        return [dataclasses.asdict(d) for d in _resolve(request, progress, apt)]

    return [_Deb(**d) for d in remembered(memo, _stamp(request, apt), ask)]


def _bad_deb(deb: _Deb, path: Path) -> str | None:
    """Why the downloaded ``path`` is not ``deb`` (None if it is)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != deb.size:
        return f"{size} bytes, not the {deb.size} the index gives"
    kind, _, want = deb.hash.partition(":")
    algorithm = _HASHES.get(kind)
    if algorithm and want:
        h = hashlib.new(algorithm)
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != want.lower():
            return f"its {kind} is {h.hexdigest()}, the index says {want}"
    return None


def _verify(debs: list[_Deb], archives: Path) -> list[Path]:
    bad = [(d, why) for d in debs if (why := _bad_deb(d, archives / d.filename))]
    if bad:
        listing = "; ".join(f"{d.filename}: {why}" for d, why in bad[:5])
        raise ImageError(f"downloaded packages do not match the signed package index ({listing}); no root was built")
    return [archives / d.filename for d in debs]


def _download(debs: list[_Deb], cache: Path, progress: Progress, apt: Apt) -> list[Path]:
    archives = cache / "debs"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with FileLock(str(archives) + ".lock"):  # two apt-gets in one partial/ would spoil each other's files
        todo = [d for d in debs if _bad_deb(d, archives / d.filename) is not None]
        for deb in todo:
            # apt would keep a damaged file of the right size; fetched again, it is checked again.
            (archives / deb.filename).unlink(missing_ok=True)
        if todo:
            mb = sum(d.size for d in todo) / 1e6
            progress(f"downloading {len(todo)} packages ({mb:.1f} MB) into {archives}")
            with tempfile.TemporaryDirectory(prefix="microvm-apt-") as tmp:
                status = Path(tmp) / "status"
                status.touch()
                # Exactly the resolved versions; apt checks each against the signed index as it lands.
                argv = [*_apt_argv(status, archives, apt), "download", *(d.spec for d in todo)]
                proc = _run_apt(argv, cwd=archives)
            if proc.returncode != 0:
                stale = (
                    " (the package lists are older than the mirror: run `apt-get update`)"
                    if "404" in proc.stderr
                    else ""
                )
                raise ImageError(
                    f"downloading packages failed: {'; '.join(_errors(proc.stderr))}{stale}; no root was built"
                )
        return _verify(debs, archives)


@dataclass
class _Alternative:
    link: str
    name: str
    path: str
    priority: int
    slaves: list[tuple[str, str, str]] = field(default_factory=list)  # (link, name, path)


def parse_alternatives(script: str) -> list[_Alternative]:
    """The ``update-alternatives --install`` calls of a maintainer script whose arguments are literal."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        at = line.find("update-alternatives")
        if at < 0:
            continue
        lexer = shlex.shlex(line[at:], posix=True, punctuation_chars=";&|<>()")
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:
            continue
        end = next((i for i, w in enumerate(words) if w and w[0] in ";&|<>()"), len(words))
        words = words[:end]
        if "--install" not in words:
            continue
        i = words.index("--install")
        args = words[i + 1 : i + 5]
        if len(args) != 4 or any("$" in a or "`" in a for a in args) or not args[3].isdigit():
            continue  # depends on shell variables: not knowable here
        alt = _Alternative(args[0], args[1], args[2], int(args[3]))
        i += 5
        while i < len(words) and words[i] == "--slave":
            slave = words[i + 1 : i + 4]
            if len(slave) == 3 and not any("$" in a or "`" in a for a in slave):
                alt.slaves.append((slave[0], slave[1], slave[2]))
            i += 4
        found.append(alt)
    return found


def _exists(tree: Path, path: str) -> bool:
    where = resolve_in_root(tree, path)
    return where is not None and os.path.lexists(where)


def _ensure_dir(tree: Path, path: str, mode: int = 0o755) -> Path:
    """The directory ``path`` inside ``tree`` (symlinks followed inside it), created if missing."""
    done = ""
    where = tree
    for comp in [p for p in path.split("/") if p]:
        done = f"{done}/{comp}"
        found = resolve_in_root(tree, done)
        if found is None:
            raise ImageError(f"cannot make {done} in the root: a parent is missing or not a directory")
        if not os.path.lexists(found):
            os.mkdir(found, mode)
            os.chmod(found, mode)  # not narrowed by the umask
        elif not stat.S_ISDIR(os.lstat(found).st_mode):
            raise ImageError(f"cannot make the directory {done} in the root: it is a file there")
        where = found
    return where


def _link(tree: Path, link: str, target: str) -> bool:
    """Make ``link`` -> ``target`` inside ``tree`` unless ``link`` exists; True if made."""
    parent, _, name = link.rstrip("/").rpartition("/")
    where = _ensure_dir(tree, parent) / name
    if os.path.lexists(where):
        return False
    os.symlink(target, where)
    return True


def apply_alternatives(tree: Path, alternatives: list[_Alternative]) -> list[str]:
    """Make the links of the best available choice of each alternative; the names made."""
    groups: dict[str, list[_Alternative]] = {}
    for alt in alternatives:
        groups.setdefault(alt.name, []).append(alt)
    made = []
    for name in sorted(groups):
        present = [a for a in groups[name] if _exists(tree, a.path)]
        if not present:
            continue
        best = min(present, key=lambda a: (-a.priority, a.path))  # highest priority; ties: the first path by name
        _link(tree, f"/etc/alternatives/{name}", best.path)
        _link(tree, best.link, f"/etc/alternatives/{name}")
        for slink, sname, spath in best.slaves:
            if _exists(tree, spath):
                _link(tree, f"/etc/alternatives/{sname}", spath)
                _link(tree, slink, f"/etc/alternatives/{sname}")
        made.append(name)
    return made


def busybox_beneath(tree: Path, busybox: Path, arch: Arch | None = None) -> int:
    """Put busybox and links for its applets where the packages left gaps; the number of links made."""
    try:
        listing = busybox_applets(busybox, arch or arches.get())
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageError(f"busybox {busybox} does not run on this host to list its applets: {exc}") from exc
    if not _exists(tree, "/bin/busybox"):
        dest = _ensure_dir(tree, "/bin") / "busybox"
        shutil.copyfile(busybox, dest)
        dest.chmod(0o755)
    made = 0
    for applet in sorted(set(listing)):
        if applet == "bin/busybox" or "/" not in applet:  # linuxrc: not a command
            continue
        name = applet.rpartition("/")[2]
        if applet not in ALWAYS and any(_exists(tree, f"/{d}/{name}") for d in BIN_DIRS):
            continue
        made += _link(tree, "/" + applet, "/bin/busybox")
    return made


PASSWD = (
    "root:x:0:0:root:/root:/bin/sh",
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
    "bin:x:2:2:bin:/bin:/usr/sbin/nologin",
    "sys:x:3:3:sys:/dev:/usr/sbin/nologin",
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
)
GROUP = ("root:x:0:", "daemon:x:1:", "bin:x:2:", "sys:x:3:", "nogroup:x:65534:")
NSSWITCH = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
)
LD_SO_CONF = "include /etc/ld.so.conf.d/*.conf\n"


def _read_etc(tree: Path, name: str) -> list[str]:
    where = resolve_in_root(tree, f"/etc/{name}")  # a link is read as the guest would, never on the host
    return where.read_text().splitlines() if where is not None and where.is_file() else []


def _write_etc(etc: Path, name: str, lines: Sequence[str]) -> None:
    if os.path.lexists(etc / name):
        os.unlink(etc / name)  # a symlink is replaced, never written through
    (etc / name).write_text("".join(f"{line}\n" for line in lines))


def _with_entries(lines: list[str], entries: Sequence[str]) -> list[str]:
    """``lines`` plus the ``name:...`` entries whose name they lack; existing lines stay as they are."""
    names = {line.split(":", 1)[0] for line in lines if line.strip()}
    return lines + [e for e in entries if e.split(":", 1)[0] not in names]


def fix_etc(tree: Path) -> None:
    """Users, groups, hosts, name service and loader configuration, hostname."""
    etc = _ensure_dir(tree, "/etc")
    _write_etc(etc, "passwd", _with_entries(_read_etc(tree, "passwd"), PASSWD))
    _write_etc(etc, "group", _with_entries(_read_etc(tree, "group"), GROUP))
    hosts = _read_etc(tree, "hosts")
    for addr in ("127.0.0.1", "::1"):
        if not any(line.split()[:1] == [addr] and "localhost" in line.split() for line in hosts):
            hosts.append(f"{addr}\tlocalhost")
    _write_etc(etc, "hosts", hosts)
    for name, text in (("nsswitch.conf", NSSWITCH), ("ld.so.conf", LD_SO_CONF)):
        if not os.path.lexists(etc / name):
            _write_etc(etc, name, text.splitlines())
    _write_etc(etc, "hostname", ["microvm"])


def _mount_points(tree: Path) -> None:
    """Mount points, and the directories Debian's base-files makes (not in the closure
    unless something depends on it): a test writing /srv/x or /var/log/y finds them."""
    for path, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("mnt", 0o755)):
        _ensure_dir(tree, path, mode)
    for path in ("srv", "opt", "home", "media", "var/log", "var/cache", "var/lib", "var/spool"):
        _ensure_dir(tree, path, 0o755)
    _ensure_dir(tree, "tmp", 0o1777)
    _ensure_dir(tree, "var/tmp", 0o1777)
    _ensure_dir(tree, "root", 0o700)


def _ldconfig(tree: Path, progress: Progress) -> None:
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/usr/sbin/ldconfig", "/sbin/ldconfig") if os.access(p, os.X_OK)), None
    )
    if ldconfig is None:
        progress("warning: no ldconfig on this host: the root has no /etc/ld.so.cache (programs still start)")
        return
    argv = [ldconfig, "-r", str(tree)]
    if not _is_root():
        unshare = shutil.which("unshare")
        argv = [unshare, "-r", *argv] if unshare else argv  # ldconfig -r chroots: a user namespace allows that
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        progress(f"warning: `{' '.join(argv)}` failed ({proc.stderr.strip()[-300:]}): the root has no ld.so.cache")


def _python_sources(tree: Path, version: str) -> list[str]:
    """Regular .py files only: a symlinked one (sitecustomize.py -> /etc/...) would be read from the host."""
    files = []
    for top in (tree / "usr" / "lib" / f"python{version}", tree / "usr" / "lib" / "python3" / "dist-packages"):
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(top):  # does not follow symlinked directories
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and stat.S_ISREG(os.lstat(path).st_mode):
                    files.append(path)
    return files


def precompile_python(tree: Path, progress: Progress, emulator: str | None = None) -> list[str]:
    """Compile the guest's Python files with the guest's interpreter; the versions done.

    ``emulator``: the user-mode QEMU that runs the guest's programs here, for a root of
    another architecture (absent: its bytecode is left to the guest, with a warning).
    """
    done = []
    bindir = tree / "usr" / "bin"
    pythons = (
        sorted(p for p in bindir.glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name)) if bindir.is_dir() else []
    )
    for python in pythons:
        if not stat.S_ISREG(python.lstat().st_mode):
            continue
        version = python.name.removeprefix("python")
        tag = f"cpython-{version.replace('.', '')}"
        interp = elf_interpreter(python)
        loader = resolve_in_root(tree, interp) if interp else None
        if loader is None or not loader.is_file():
            progress(f"warning: {python.name}'s loader {interp} is not in the root: its bytecode is not precompiled")
            continue
        libdirs = []
        for pattern in ("lib/*-linux-gnu*", "usr/lib/*-linux-gnu*", "lib64", "usr/lib64", "lib", "usr/lib"):
            for candidate in sorted(tree.glob(pattern)):
                real = resolve_in_root(tree, "/" + candidate.relative_to(tree).as_posix())
                if real is not None and real.is_dir() and str(real) not in libdirs:
                    libdirs.append(str(real))
        sources = _python_sources(tree, version)
        progress(f"compiling Python {version} bytecode ({len(sources)} files) with the guest's interpreter")
        env = {
            "PATH": "/usr/bin:/bin",
            "LC_ALL": "C.UTF-8",
            "PYTHONHOME": str(tree / "usr"),  # its stdlib, not the host's
            "PYTHONDONTWRITEBYTECODE": "1",  # what it imports itself would get host paths
        }
        argv = [str(loader), "--library-path", ":".join(libdirs), str(python), "-S", "-B", "-m", "compileall"]
        if emulator is not None:
            found = shutil.which(emulator)
            if found is None:
                progress(f"warning: no {emulator} (apt-get install qemu-user-static) to run the guest's {python.name}: "
                         "bytecode not precompiled, first starts are slow")  # fmt: skip
                continue
            argv = [found, *argv]
        argv += ["-q", "-f", "--invalidation-mode", "timestamp", "-s", str(tree), "-p", "/", "-i", "-"]
        # compileall runs the files of one -i list one after another: one process per core instead.
        workers = max(1, min(4, os.cpu_count() or 1))
        chunks = ["".join(f"{f}\n" for f in sources[i::workers]) for i in range(workers)]
        try:
            procs = [
                subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in chunks
            ]
        except OSError as exc:  # e.g. ENOEXEC: a guest of another architecture
            progress(f"warning: the guest's {python.name} cannot run on this host ({exc}): bytecode not precompiled")
            continue
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs = list(pool.map(lambda pc: pc[0].communicate(pc[1].encode()), zip(procs, chunks, strict=True)))
        failed = sum(out.decode(errors="replace").count("*** Error compiling") for out, _ in outputs)
        sentinel = tree / "usr" / "lib" / f"python{version}" / "__pycache__" / f"os.{tag}.pyc"
        if not sentinel.is_file():
            err = b"".join(e for _, e in outputs).decode(errors="replace").strip()[-400:]
            progress(f"warning: the guest's {python.name} did not compile its stdlib ({err}): first starts are slow")
            continue
        if failed:
            progress(f"{failed} Python files of the root do not compile (test data or Python 2 code): left as source")
        done.append(version)
    return done


def _clamp_mtimes(tree: Path, newest: int) -> None:
    """Whatever the build wrote now gets the time of the newest packaged file instead."""
    limit = newest * 10**9
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime_ns > limit:
                os.utime(path, ns=(limit, limit), follow_symlinks=False)
    os.utime(tree, ns=(limit, limit))


def _merge(src: Path, dest: Path, tree: Path, package: str) -> None:
    """Move ``src``'s entries into ``dest`` (a directory inside ``tree``), never through an outward symlink."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        target = dest / entry.name
        rel = "/" + target.relative_to(tree).as_posix()
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            os.rename(entry.path, target)
            continue
        if entry.is_dir(follow_symlinks=False):
            if stat.S_ISDIR(st.st_mode):
                _merge(Path(entry.path), target, tree, package)
                continue
            real = resolve_in_root(tree, rel) if stat.S_ISLNK(st.st_mode) else None
            if real is not None and real.is_dir():  # e.g. bin -> usr/bin: merged inside the root
                _merge(Path(entry.path), real, tree, package)
                continue
            raise ImageError(f"package {package} ships the directory {rel}, and the root has a non-directory there")
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"package {package} ships {rel}, and the root has a directory there")
        os.replace(entry.path, target)  # two packages with one file: the later one wins (dpkg wants Replaces:)


def _unpack(debs: list[_Deb], paths: list[Path], tree: Path, work: Path, progress: Progress) -> list[_Alternative]:
    mb = sum(d.size for d in debs) / 1e6
    progress(f"unpacking {len(debs)} packages ({mb:.1f} MB of .deb files)")

    def raw_extract(i: int) -> None:
        proc = subprocess.run(["dpkg-deb", "-R", str(paths[i]), str(work / str(i))], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"dpkg-deb cannot unpack {paths[i].name}: {proc.stderr.strip()[-500:]}")

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(raw_extract, range(len(debs))))
    alternatives = []
    order = sorted(range(len(debs)), key=lambda i: (debs[i].name != "base-files", debs[i].name))
    for i in order:
        unpacked = work / str(i)
        control = unpacked / "DEBIAN"
        postinst = control / "postinst"
        if postinst.is_file():
            alternatives += parse_alternatives(postinst.read_text(errors="replace"))
        shutil.rmtree(control, ignore_errors=True)
        _merge(unpacked, tree, tree, debs[i].name)
    return alternatives


def _newest_file(tree: Path) -> int:
    newest = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            newest = max(newest, int(os.lstat(os.path.join(dirpath, name)).st_mtime))
    return newest


def _tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _build(
    staging: Path,
    request: list[str],
    debs: list[_Deb],
    key: str,
    cache: Path,
    progress: Progress,
    busybox: Path,
    apt: Apt,
) -> None:
    paths = _download(debs, cache, progress, apt)
    tree = staging / "tree"
    tree.mkdir()
    work = staging / "unpacked"
    work.mkdir()
    alternatives = _unpack(debs, paths, tree, work, progress)
    shutil.rmtree(work)
    newest = _newest_file(tree)
    progress("fix-ups: /etc, alternatives, busybox applets, mount points, ld.so.cache")
    fix_etc(tree)
    apply_alternatives(tree, alternatives)
    busybox_beneath(tree, busybox, apt.arch)
    _mount_points(tree)
    _ldconfig(tree, progress)
    precompile_python(tree, progress, apt.arch.user_emulator())
    _clamp_mtimes(tree, newest)
    manifest = {
        "key": key,
        "request": request,
        "packages": sorted(f"{d.name}={d.version}" for d in debs),
        "size": _tree_size(tree),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def package_root(
    packages: Sequence[str], cache: Path, progress: Progress, busybox: Path, apt: Apt | None = None
) -> PackageRoot:
    """The root of ``packages`` and their dependencies (of ``apt``'s architecture, default
    the host's), built once per set of resolved versions."""
    apt = apt or host_apt(cache)
    request = _check_names(packages)
    apt.ensure_lists(progress)
    debs = _closure(request, cache, progress, apt)
    names = sorted(f"{d.name}={d.version}" for d in debs)
    busybox_sha = hashlib.sha256(busybox.read_bytes()).hexdigest()
    ident: list[object] = [ROOTFS_VERSION, names, busybox_sha]
    if not apt.native:  # (the host's own keeps the keys it had)
        ident.append(apt.arch.debian)
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]
    final = cache / "roots" / key
    if not (final / "manifest.json").is_file():
        _need_tools()
        cached_build(final, lambda staging: _build(staging, request, debs, key, cache, progress, busybox, apt))
    manifest = json.loads((final / "manifest.json").read_text())
    return PackageRoot(tree=final / "tree", key=key, packages=tuple(names), size=int(manifest["size"]))
