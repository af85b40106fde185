"""The cache's build-once-under-a-lock step, across real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_microvm.cache import cache_dir, cached_build
from tests.agent_harness import reaping

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pytest_microvm.cache import cached_build
    final, log = Path(sys.argv[1]), Path(sys.argv[2])
    def build(staging):
        with log.open("a") as f:
            f.write("built\\n")
        time.sleep(0.5)  # long enough that the others arrive while it builds
        (staging / "artifact").write_text("done")
    cached_build(final, build)
    print((final / "artifact").read_text())
    """
)


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    final, log = tmp_path / "cache" / "thing", tmp_path / "log"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(final), str(log)], stdout=subprocess.PIPE) for _ in range(4)
    ]
    with reaping(*procs):
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert outputs == [b"done\n"] * 4
    assert log.read_text() == "built\n"
    assert sorted(x.name for x in final.parent.iterdir()) == ["thing", "thing.lock"]  # no staging left


def test_failed_build_leaves_nothing_and_can_be_retried(tmp_path: Path) -> None:
    final = tmp_path / "thing"

    def broken(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        cached_build(final, broken)
    assert not final.exists()
    assert [x.name for x in tmp_path.iterdir()] == ["thing.lock"]
    assert cached_build(final, lambda s: (s / "ok").write_text("y")) is True
    assert cached_build(final, lambda s: None) is False
    assert (final / "ok").read_text() == "y"


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    assert cache_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("MICROVM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pytest-microvm"
