"""EXEC's ``user`` (docs/protocol.md): the real agent, on the host, runs commands as other
users looked up in /etc/passwd and /etc/group, as runc and ``docker run --user`` do.
Changing user needs root (the tests and CI run as root)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
from pathlib import Path

import pytest

from pytest_microvm.client import AgentClient
from pytest_microvm.errors import AgentError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user (the agent runs as PID 1 there)")
IDS = 'id -u; id -g; id -G; echo "$HOME"'


def _ids(client: AgentClient, user: str, **kw: object) -> list[str]:
    r = client.run(["sh", "-c", IDS], user=user, check=True, **kw)  # type: ignore[arg-type]
    return r.stdout.decode().splitlines()


def test_a_user_by_name_gets_its_ids_groups_and_home(client: AgentClient) -> None:
    nobody = pwd.getpwnam("nobody")
    uid, gid, home = str(nobody.pw_uid), str(nobody.pw_gid), nobody.pw_dir
    assert _ids(client, "nobody") == [uid, gid, gid, home]
    assert _ids(client, f"{uid}:{gid}") == [uid, gid, gid, home]  # numbers: the passwd entry still gives HOME
    assert _ids(client, "") == ["0", "0", _ids(client, "root")[2], "/root"]  # empty: the agent's own, root


def test_a_uid_not_in_passwd_gets_group_0_and_home_slash(client: AgentClient) -> None:
    assert _ids(client, "4242") == ["4242", "0", "0", "/"]


def test_a_group_by_name_or_number_replaces_the_users(client: AgentClient) -> None:
    daemon = grp.getgrnam("daemon")
    assert _ids(client, "nobody:daemon")[1] == str(daemon.gr_gid)
    assert _ids(client, "nobody:4343")[1:3] == ["4343", "4343"]


def test_supplementary_groups_come_from_the_group_file(client: AgentClient) -> None:
    # A group that lists a user as a member: root's own supplementary groups show them here.
    listed = [g for g in grp.getgrall() if "nobody" in g.gr_mem]
    groups = _ids(client, "nobody")[2].split()
    assert sorted(groups) == sorted({str(pwd.getpwnam("nobody").pw_gid), *(str(g.gr_gid) for g in listed)})


def test_the_environments_home_wins(client: AgentClient) -> None:
    assert _ids(client, "nobody", env={"HOME": "/elsewhere"})[3] == "/elsewhere"


def test_the_cwd_is_checked_with_the_users_rights(client: AgentClient, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert client.run(["pwd"], cwd=str(private), check=True).stdout == f"{private}\n".encode()  # root may
    with pytest.raises(AgentError, match=f"user nobody: chdir {private}: Permission denied") as info:
        client.run(["pwd"], cwd=str(private), user="nobody")
    assert info.value.code == errno.EACCES


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("no-such-user-xyz", "user no-such-user-xyz: no such user in /etc/passwd"),
        (
            "nobody:no-such-group-xyz",
            "user nobody:no-such-group-xyz: group no-such-group-xyz: no such group in /etc/group",
        ),
    ],
)
def test_unknown_names_are_errors_naming_them(client: AgentClient, user: str, message: str) -> None:
    with pytest.raises(AgentError, match=message) as info:
        client.run(["true"], user=user)
    assert info.value.code == errno.ENOENT
    assert client.run(["true"]).ok  # the connection carries on


def test_a_command_as_another_user_cannot_do_what_root_can(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "root-only"
    target.write_text("x")
    target.chmod(0o600)
    r = client.run(["cat", str(target)], user="nobody")
    assert r.exit_code != 0 and b"Permission denied" in r.stderr
