"""A suite split across CI runners with pytest-split: the shards together run every test
exactly once, VM tests included (each shard boots its own VMs from its own image cache)."""

from __future__ import annotations

import json
import re

import pytest

from pytest_microvm import GuestImage

SUITE = """
import pytest

@pytest.mark.parametrize("i", range(4))
def test_vm(microvm, i):
    assert microvm.run(["echo", str(i)]).stdout == f"{i}\\n".encode()

@pytest.mark.parametrize("i", range(3))
def test_plain(i):
    pass
"""


@pytest.fixture
def shared_cache(microvm_image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_CACHE_DIR", str(microvm_image.directory.parents[1]))


def _ran(result: pytest.RunResult) -> list[str]:
    return re.findall(r"^(test_split\.py::\S+) PASSED", result.stdout.str(), re.M)


def test_two_shards_run_every_test_once(pytester: pytest.Pytester, shared_cache: None) -> None:
    pytester.makepyfile(test_split=SUITE)
    durations = pytester.path / "durations.json"
    base = ["-p", "no:cacheprovider", "-v", f"--durations-path={durations}"]
    whole = pytester.runpytest_subprocess(*base, "--store-durations", timeout=600)
    whole.assert_outcomes(passed=7)
    recorded = json.loads(durations.read_text())
    assert len(recorded) == 7 and all(t > 0 for t in recorded.values())
    shards = [pytester.runpytest_subprocess(*base, "--splits", "2", "--group", str(g), timeout=600) for g in (1, 2)]
    ran = [_ran(s) for s in shards]
    assert all(ran), [s.stdout.str()[-2000:] for s in shards]  # neither shard is empty
    assert sorted(ran[0] + ran[1]) == sorted(_ran(whole))  # together: every test, once
    assert not set(ran[0]) & set(ran[1])
    # Balanced by the recorded durations: the VM tests are spread, not all in one shard.
    assert all(any("test_vm" in t for t in r) for r in ran), ran
