"""The house rules of ARCHITECTURE.md, checked on the source: which folder may import which, no
import circle between modules, and small modules.

Every import counts, also one inside a function or under TYPE_CHECKING: a late import hides a
dependency from the reader, not from the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "composer", "merge", "models", "registry", "router_train", "serve")

# Folder -> the folders it may import (besides itself). registry.errors holds ComposerError,
# the base of every user-facing error, which any folder may import.
ALLOWED: dict[str, set[str]] = {
    "cli": {"composer", "merge", "models", "registry", "router_train", "serve"},
    "composer": {"merge", "models", "registry", "router_train"},
    "serve": {"models", "registry", "router_train"},
    "merge": set(),
    "models": set(),
    "router_train": set(),
    "registry": set(),
}
SHARED = {"registry.errors"}
MAX_LINES = 400
LONG_REASON = "Longer than 400 lines"  # a module over the limit says why in its docstring


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Every project module ``path`` imports (absolute names; relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def project_edges() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for imported in imports_of(path, name):
            # the longest project module the import names (a symbol import names its module)
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def test_folders_import_only_downwards() -> None:
    bad = []
    for mod, targets in project_edges().items():
        top = mod.split(".")[0]
        for t in targets:
            t_top = t.split(".")[0]
            if t_top != top and t_top not in ALLOWED[top] and t not in SHARED:
                bad.append(f"{mod} imports {t}")
    assert not bad, "imports against ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_import_circle() -> None:
    edges = project_edges()

    # Tarjan's strongly connected components: any component of two or more is a circle. A
    # package's __init__ importing its own submodules is not one (Python runs it first anyway).
    def real(a: str, b: str) -> bool:
        return not b.startswith(a + ".")

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if not real(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_small_or_say_why(name: str) -> None:
    path = modules()[name]
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert LONG_REASON in doc, (
            f"{path.relative_to(REPO)} has {lines} lines: split it, or say in its docstring "
            f"why not ('{LONG_REASON}: ...')"
        )


def test_the_rules_see_the_packages() -> None:
    """The checks above would pass vacuously if the scan found nothing."""
    edges = project_edges()
    assert "composer.build" in edges and "serve.middleware" in edges
    assert "composer.compose.plan" in edges["composer.build"]
