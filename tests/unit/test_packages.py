"""Package roots: resolution and its memo, download checks, unpacking, and each fix-up.

A few tests use the host's real apt (its lists, the network) with tiny closures; the
fix-ups are tested on synthetic trees.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_microvm import ImageError
from pytest_microvm import arch as arches
from pytest_microvm.image import packages
from pytest_microvm.image.apt import Apt
from pytest_microvm.image.packages import (
    PackageRoot,
    _Deb,
    _merge,
    _parse_uris,
    _verify,
    apply_alternatives,
    busybox_beneath,
    fix_etc,
    package_root,
    parse_alternatives,
)
from pytest_microvm.image.sources import APT_LISTS, find_busybox

HAVE_APT = shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None
real_apt = pytest.mark.skipif(
    not HAVE_APT or not any(APT_LISTS.glob("*Packages*")), reason="needs apt-get, dpkg-deb and package lists"
)
OFFLINE = re.compile(r"Failed to fetch|Temporary failure resolving|Could not resolve|Unable to connect")


def build(request: list[str], cache: Path) -> PackageRoot:
    try:
        return package_root(request, cache, lambda m: None, find_busybox(cache, lambda m: None))
    except ImageError as exc:
        if OFFLINE.search(str(exc)):
            pytest.skip(f"no network to download packages: {exc}")
        raise


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one download of libc6 for the tests that need real packages


@pytest.fixture(scope="module")
def hello_root(shared_cache: Path) -> PackageRoot:
    return build(["hello"], shared_cache)


@real_apt
def test_unknown_package_is_named_and_nothing_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ImageError) as err:
        package_root(["nosuchpkg-microvm"], cache, lambda m: None, Path("/nonexistent-busybox"))
    assert re.search(
        r"unknown package 'nosuchpkg-microvm' \(apt-get: Unable to locate package nosuchpkg-microvm\)"
        r".*; nothing was cached$",
        str(err.value),
    ), err.value
    assert list(cache.rglob("*")) == []


@real_apt
def test_hello_root_is_unpacked_and_fixed_up(hello_root: PackageRoot) -> None:
    tree = hello_root.tree
    names = {p.split("=")[0] for p in hello_root.packages}
    assert {"hello", "libc6", "dash"} <= names and list(hello_root.packages) == sorted(hello_root.packages)
    assert re.fullmatch(r"[0-9a-f]{20}", hello_root.key) and tree.parent.name == hello_root.key
    assert os.readlink(tree / "bin" / "sh") == "dash"  # a package's shell, not busybox's ash
    assert os.readlink(tree / "bin" / "cat") == "/bin/busybox"  # no coreutils: busybox fills the gap
    assert (tree / "bin" / "busybox").stat().st_mode & 0o111
    assert (tree / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert (tree / "etc" / "hostname").read_text() == "microvm\n"
    assert (tree / "tmp").stat().st_mode & 0o7777 == 0o1777
    if shutil.which("ldconfig") or Path("/usr/sbin/ldconfig").exists():
        assert (tree / "etc" / "ld.so.cache").is_file()
    assert hello_root.size == sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    # The guest's own loader and libc run its hello (same architecture as the host here).
    loader = tree / "lib64" / "ld-linux-x86-64.so.2"
    if loader.exists() and os.uname().machine == "x86_64":
        libs = f"{tree}/lib/x86_64-linux-gnu:{tree}/usr/lib/x86_64-linux-gnu"
        out = subprocess.run(
            [
                str(tree / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                "--library-path",
                libs,
                str(tree / "usr/bin/hello"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout == "Hello, world!\n"


@real_apt
def test_warm_lookup_is_fast_and_asks_apt_nothing(
    hello_root: PackageRoot, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a warm lookup ran a program: {args}")

    monkeypatch.setattr(subprocess, "run", no)
    monkeypatch.setattr(subprocess, "Popen", no)
    busybox = find_busybox(shared_cache, lambda m: None)
    start = time.perf_counter()
    again = package_root(["hello"], shared_cache, lambda m: pytest.fail(m), busybox)
    assert time.perf_counter() - start < 0.2
    assert again == hello_root


def test_closure_is_remembered_until_the_lists_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb_dists_x_main_binary-amd64_Packages").write_text("x")
    apt = Apt(arches.get(), tmp_path / "cache")
    apt.lists = lists
    monkeypatch.setattr(packages, "_need_tools", lambda: None)
    calls = []

    def resolve(request: list[str], progress: object, apt: Apt) -> list[_Deb]:
        calls.append(request)
        return [_Deb("hello", "2.10-3", "amd64", "hello_2.10-3_amd64.deb", 10, "")]

    monkeypatch.setattr(packages, "_resolve", resolve)
    first = packages._closure(["hello"], tmp_path / "cache", lambda m: None, apt)
    assert packages._closure(["hello"], tmp_path / "cache", lambda m: None, apt) == first
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "cache" / "apt").iterdir() if "tmp" in p.name] == []  # written atomically
    os.utime(lists / "deb_dists_x_main_binary-amd64_Packages", ns=(1, 1))  # as `apt-get update` would
    packages._closure(["hello"], tmp_path / "cache", lambda m: None, apt)
    assert len(calls) == 2
    packages._closure(["hello", "dash"], tmp_path / "cache", lambda m: None, apt)
    assert len(calls) == 3  # another request, another entry


def test_no_apt_on_the_host_points_to_rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ImageError, match=r"needs apt-get and dpkg-deb.*no apt-get or dpkg-deb: give rootfs="):
        package_root(["hello"], tmp_path / "cache", lambda m: None, Path("/bin/true"))


@pytest.mark.parametrize("name", ["-oAPT::Get::AllowUnauthenticated=true", "Python3", "a b", ""])
def test_option_like_or_odd_names_are_refused(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "_resolve", lambda *a: pytest.fail("apt was asked"))
    with pytest.raises(ImageError, match="not a Debian package name"):
        package_root(["hello", name], tmp_path, lambda m: None, Path("/bin/true"))


def test_print_uris_lines_give_name_version_and_arch() -> None:
    out = (
        "'http://deb.debian.org/debian/pool/main/z/zlib/zlib1g_1%3a1.2.13.dfsg-1_amd64.deb' "
        "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb 87000 SHA256:abcd\n"
        "'http://x/tzdata_2024a-0_all.deb' tzdata_2024a-0_all.deb 250000 MD5Sum:ef01\n"
        "Reading package lists...\n"
    )
    tz, zlib = _parse_uris(out)
    assert (zlib.name, zlib.version, zlib.arch, zlib.size, zlib.hash) == (
        "zlib1g",
        "1:1.2.13.dfsg-1",
        "amd64",
        87000,
        "SHA256:abcd",
    )
    assert zlib.spec == "zlib1g:amd64=1:1.2.13.dfsg-1" and tz.spec == "tzdata=2024a-0"


def test_downloads_are_checked_for_size_and_hash(tmp_path: Path) -> None:
    data = b"!<arch>\n" + b"x" * 100

    def deb(name: str, content: bytes, algo: str = "SHA256", digest: str | None = None) -> _Deb:
        (tmp_path / f"{name}_1_amd64.deb").write_bytes(content)
        digest = digest or hashlib.new(algo.lower().replace("md5sum", "md5"), content).hexdigest()
        return _Deb(name, "1", "amd64", f"{name}_1_amd64.deb", len(data), f"{algo}:{digest}")

    good = [deb("a", data), deb("b", data, "MD5Sum")]
    assert _verify(good, tmp_path) == [tmp_path / "a_1_amd64.deb", tmp_path / "b_1_amd64.deb"]
    for bad, why in (
        (deb("c", data[:-1]), "107 bytes, not the 108"),
        (deb("d", data, digest="0" * 64), "its SHA256 is"),
        (_Deb("e", "1", "amd64", "e_1_amd64.deb", 5, ""), "missing"),
    ):
        with pytest.raises(ImageError, match=rf"{bad.filename}: {why}.*no root was built"):
            _verify([*good, bad], tmp_path)


def fake_busybox(tmp_path: Path, applets: list[str]) -> Path:
    path = tmp_path / "busybox"
    path.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(applets) + "\n")
    path.chmod(0o755)
    return path


APPLETS = ["bin/busybox", "linuxrc", "bin/sh", "bin/cat", "usr/bin/tail", "bin/stat", "bin/mount", "usr/sbin/ip"]


def test_busybox_goes_beneath_the_packages(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for d in ("bin", "sbin", "usr/bin"):
        (tree / d).mkdir(parents=True)
    (tree / "usr" / "bin" / "tail").write_text("package tail")
    (tree / "sbin" / "ip").write_text("package ip")  # busybox would put its ip in /usr/sbin, earlier on PATH
    (tree / "usr" / "bin" / "sh").write_text("some sh")
    (tree / "bin" / "stat").symlink_to("/usr/bin/stat-elsewhere")  # exists as a path, even dangling
    busybox = fake_busybox(tmp_path, APPLETS)
    made = busybox_beneath(tree, busybox)
    assert (tree / "bin" / "busybox").read_bytes() == busybox.read_bytes()
    assert os.readlink(tree / "bin" / "sh") == "/bin/busybox"  # /bin/sh is run by path: always there
    assert os.readlink(tree / "bin" / "cat") == "/bin/busybox"
    assert os.readlink(tree / "bin" / "mount") == "/bin/busybox"
    assert (tree / "usr" / "bin" / "tail").read_text() == "package tail"
    assert os.readlink(tree / "bin" / "stat") == "/usr/bin/stat-elsewhere"
    assert not os.path.lexists(tree / "usr" / "sbin" / "ip")
    assert not os.path.lexists(tree / "linuxrc")
    assert made == 3


def test_busybox_applets_seen_through_a_merged_usr(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "bin").symlink_to("usr/bin")
    (tree / "usr" / "bin" / "cat").write_text("package cat")
    (tree / "usr" / "bin" / "busybox").write_text("a package's busybox")
    busybox_beneath(tree, fake_busybox(tmp_path, APPLETS))
    assert (tree / "usr" / "bin" / "cat").read_text() == "package cat"
    assert (tree / "usr" / "bin" / "busybox").read_text() == "a package's busybox"  # not replaced
    assert os.readlink(tree / "usr" / "bin" / "sh") == "/bin/busybox"
    assert (tree / "bin").is_symlink()


MAWK_POSTINST = """#!/bin/sh
set -e
if [ "$1" = configure ]; then
    update-alternatives \\
        --install /usr/bin/awk awk /usr/bin/mawk 5 \\
        --slave /usr/share/man/man1/awk.1.gz awk.1.gz \\
                /usr/share/man/man1/mawk.1.gz \\
        --slave /usr/bin/nawk nawk /usr/bin/mawk
    update-alternatives --quiet --install /usr/bin/awk awk /usr/bin/gawk 10 || true
    update-alternatives --install /usr/bin/pager pager "$PAGER_PATH" 20
    update-alternatives --remove awk /usr/bin/oldawk
fi
"""


def test_alternatives_are_parsed_from_a_postinst() -> None:
    mawk, gawk = parse_alternatives(MAWK_POSTINST)
    assert (mawk.link, mawk.name, mawk.path, mawk.priority) == ("/usr/bin/awk", "awk", "/usr/bin/mawk", 5)
    assert mawk.slaves == [
        ("/usr/share/man/man1/awk.1.gz", "awk.1.gz", "/usr/share/man/man1/mawk.1.gz"),
        ("/usr/bin/nawk", "nawk", "/usr/bin/mawk"),
    ]
    assert (gawk.path, gawk.priority, gawk.slaves) == ("/usr/bin/gawk", 10, [])


def test_alternatives_link_the_best_installed_choice(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "mawk").write_text("mawk")
    made = apply_alternatives(tree, parse_alternatives(MAWK_POSTINST))
    assert made == ["awk"]  # gawk has the higher priority but is not in the root
    assert os.readlink(tree / "usr" / "bin" / "awk") == "/etc/alternatives/awk"
    assert os.readlink(tree / "etc" / "alternatives" / "awk") == "/usr/bin/mawk"
    assert os.readlink(tree / "usr" / "bin" / "nawk") == "/etc/alternatives/nawk"
    assert not os.path.lexists(tree / "etc" / "alternatives" / "awk.1.gz")  # its target is not there
    (tree / "usr" / "bin" / "gawk").write_text("gawk")
    (tree / "usr" / "bin" / "awk").unlink()
    (tree / "usr" / "bin" / "awk").write_text("shipped by a package")
    shutil.rmtree(tree / "etc")
    apply_alternatives(tree, parse_alternatives(MAWK_POSTINST))
    assert os.readlink(tree / "etc" / "alternatives" / "awk") == "/usr/bin/gawk"
    assert (tree / "usr" / "bin" / "awk").read_text() == "shipped by a package"


def test_etc_fixups_keep_existing_entries(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nmessagebus:x:100:101::/run:/bin/false\n")
    (tree / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    (tree / "etc" / "nsswitch.conf").write_text("hosts: files\n")
    outside = tmp_path / "host-hosts"
    outside.write_text("10.0.0.1 somewhere\n")
    (tree / "etc" / "hosts").symlink_to(outside)  # must be replaced, never written through
    fix_etc(tree)
    passwd = (tree / "etc" / "passwd").read_text().splitlines()
    assert passwd[:2] == ["root:x:0:0:root:/root:/bin/bash", "messagebus:x:100:101::/run:/bin/false"]
    assert [line.split(":")[0] for line in passwd] == ["root", "messagebus", "daemon", "bin", "sys", "nobody"]
    group = (tree / "etc" / "group").read_text().splitlines()
    assert [line.split(":")[0] for line in group] == ["root", "staff", "daemon", "bin", "sys", "nogroup"]
    assert (tree / "etc" / "hosts").read_text() == "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    assert outside.read_text() == "10.0.0.1 somewhere\n"
    assert (tree / "etc" / "nsswitch.conf").read_text() == "hosts: files\n"
    assert (tree / "etc" / "hostname").read_text() == "microvm\n"
    assert (tree / "etc" / "ld.so.conf").read_text() == "include /etc/ld.so.conf.d/*.conf\n"
    fix_etc(tree)
    assert (tree / "etc" / "passwd").read_text().splitlines() == passwd  # idempotent


def test_merging_a_package_follows_symlinks_inside_the_root_only(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "lib").mkdir()
    (tree / "bin").symlink_to("usr/bin")
    (tree / "lib").symlink_to("/usr/lib")  # absolute: the host's /usr/lib on the host, the root's in the guest
    unpacked = tmp_path / "pkg"
    (unpacked / "bin").mkdir(parents=True)
    (unpacked / "bin" / "tool").write_text("tool")
    (unpacked / "lib").mkdir()
    (unpacked / "lib" / "libmicrovm-test.so").write_text("lib")
    _merge(unpacked, tree, tree, "pkg")
    assert (tree / "usr" / "bin" / "tool").read_text() == "tool"
    assert (tree / "usr" / "lib" / "libmicrovm-test.so").read_text() == "lib"
    assert not Path("/usr/lib/libmicrovm-test.so").exists()
    (unpacked / "usr" / "bin" / "tool").mkdir(parents=True)
    with pytest.raises(ImageError, match=r"package pkg ships the directory /usr/bin/tool, and the root has a non-dir"):
        _merge(unpacked, tree, tree, "pkg")


@pytest.fixture(scope="module")
def python_root(shared_cache: Path) -> PackageRoot:
    return build(["python3-minimal"], shared_cache)


@real_apt
def test_python_bytecode_is_precompiled_with_guest_paths(python_root: PackageRoot) -> None:
    tree = python_root.tree
    (python,) = [p for p in (tree / "usr" / "bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name)]
    version = python.name.removeprefix("python")
    stdlib = tree / "usr" / "lib" / python.name
    pyc = stdlib / "__pycache__" / f"os.cpython-{version.replace('.', '')}.pyc"
    data = pyc.read_bytes()
    source = (stdlib / "os.py").stat()
    assert int.from_bytes(data[4:8], "little") == 0  # timestamp-checked, not hash-based
    assert int.from_bytes(data[8:12], "little") == int(source.st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(data[12:16], "little") == source.st_size
    assert f"/usr/lib/{python.name}/os.py".encode() in data and str(tree).encode() not in data
    assert not list(stdlib.glob("__pycache__/sitecustomize.*"))  # a symlink to /etc: not compiled from the host
    if os.uname().machine == "x86_64":
        # The guest's interpreter accepts them: "matches" means the .pyc was used, not recompiled.
        libs = f"{tree}/lib/x86_64-linux-gnu:{tree}/usr/lib/x86_64-linux-gnu"
        loader = str(tree / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        proc = subprocess.run(
            [loader, "--library-path", libs, str(python), "-S", "-B", "-v", "-c", "import re"],  # os is frozen
            capture_output=True,
            text=True,
            env={"PYTHONHOME": str(tree / "usr")},
            check=True,
        )
        used = stdlib / "re" / "__pycache__" / f"__init__.cpython-{version.replace('.', '')}.pyc"
        assert f"# {used} matches {stdlib / 're' / '__init__.py'}" in proc.stderr, proc.stderr[-2000:]
