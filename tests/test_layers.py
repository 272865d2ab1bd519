"""The layers import one way (foundation <- backends <- orchestrator) and no two files import each other.

Read from the source with `ast`, every import counted wherever it sits (top level, inside a function, or under
TYPE_CHECKING), since a lazy import that closes a circle still ties the two files together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "backends", "orchestrator", "prompts")
# which package may import which (itself always)
MAY_IMPORT = {
    "foundation": set(),
    "prompts": set(),
    "backends": {"foundation", "prompts"},
    "orchestrator": {"foundation", "backends", "prompts"},
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports: `from a.b import c` counts a.b.c when that is a module, else a.b."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in known else module)
    return {t for t in targets if t in known and t != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_layers_import_one_way(graph: dict[str, set[str]]) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        for target in targets
        if (mine := name.split(".")[0]) != (theirs := target.split(".")[0]) and theirs not in MAY_IMPORT[mine]
    )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    """Strongly connected components of the import graph (Tarjan); any with two or more files is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_walk_sees_imports(graph: dict[str, set[str]]) -> None:
    """Guards the two tests above against passing because the walk found nothing."""
    assert "backends.base" in graph["backends"]
    assert any(t.startswith("backends") for t in graph["orchestrator.pipeline"])
    assert len(graph) > 60
