"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_microvm import build_agent
from pytest_microvm.client import AgentClient
from tests.agent_harness import HostAgent, host_agent


@pytest.fixture(scope="session")
def agent_binary() -> Path:
    """The real agent, compiled once (cached) from guest-image/agent/agent.c."""
    return build_agent()


@pytest.fixture
def fresh_agent(agent_binary: Path, tmp_path: Path) -> Iterator[HostAgent]:
    """An agent process of its own (for tests that break connections)."""
    with host_agent(agent_binary, tmp_path) as agent:
        yield agent


@pytest.fixture(scope="module")
def module_agent(agent_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostAgent]:
    with host_agent(agent_binary, tmp_path_factory.mktemp("agent")) as agent:
        yield agent


@pytest.fixture(scope="module")
def client(module_agent: HostAgent) -> Iterator[AgentClient]:
    """A handshaken client of one agent shared by a module's tests."""
    with module_agent.client() as c:
        yield c
