"""Dependencies between the package's modules run one way: no import cycles, no layer reaching up.

Every import counts, at module level or inside a function, under TYPE_CHECKING or not:
a cycle that only a lazy import hides is still a cycle in the design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_microvm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The package's modules ``name`` imports: ``from pkg import sub`` counts as pkg.sub."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def _leaf(name: str) -> bool:
    return MODULES[name].name != "__init__.py"


def test_no_import_cycles_between_modules() -> None:
    # Packages' __init__ files only re-export (lazily); a cycle through one is not a design cycle.
    graph = {m: {d for d in _imports(m) if _leaf(d)} for m in MODULES if _leaf(m)}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # How bytes move knows nothing of VMs, commands or pytest.
        ("pytest_microvm.channel", ("pytest_microvm.machine", "pytest_microvm.client", "pytest_microvm.plugin")),
        # The agent client speaks over any connected socket; it never starts a VM.
        ("pytest_microvm.client", ("pytest_microvm.machine", "pytest_microvm.plugin", "pytest_microvm.cli")),
        ("pytest_microvm.machine.ssh", ("pytest_microvm.machine.vm", "pytest_microvm.machine.snapshot")),
        ("pytest_microvm.image", ("pytest_microvm.machine", "pytest_microvm.channel", "pytest_microvm.client")),
        # The lifecycle knows launch strategies only through their interface, never which one.
        ("pytest_microvm.machine.vm", ("pytest_microvm.machine.snapshot",)),
        ("pytest_microvm.machine.launch", ("pytest_microvm.machine.vm", "pytest_microvm.machine.snapshot")),
        # Templates on disk and a clone's RAM are data: they start no VM.
        ("pytest_microvm.machine.snapshot.store", ("pytest_microvm.machine.vm", "pytest_microvm.machine.launch")),
        ("pytest_microvm.machine.snapshot.ram", ("pytest_microvm.machine.vm", "pytest_microvm.machine.launch")),
        ("pytest_microvm.machine.snapshot.key", ("pytest_microvm.machine.vm", "pytest_microvm.machine.launch")),
    ],
)
def test_lower_layers_do_not_import_higher_ones(layer: str, forbidden: tuple[str, ...]) -> None:
    offenders = {
        f"{m} imports {d}"
        for m in MODULES
        if m == layer or m.startswith(layer + ".")
        for d in _imports(m)
        if any(d == f or d.startswith(f + ".") for f in forbidden)
    }
    assert not offenders, sorted(offenders)


def test_importing_the_ssh_clients_does_not_import_the_vm_lifecycle() -> None:
    code = "import sys, pytest_microvm.machine.ssh; print(sorted(m for m in sys.modules if 'microvm' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pytest_microvm.machine.ssh" in out and "pytest_microvm.machine.vm" not in out, out
