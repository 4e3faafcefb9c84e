"""The house's shape, checked: no two modules share a name, and no two parts of the project
import each other, directly or round a longer circle, not even lazily inside a function (a
package's face importing its own parts is what a face is for)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from conftest import REPO

PACKAGES = ("launcher", "trainer")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, at its top or inside its functions."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_two_modules_share_a_name():
    names = Counter(path.stem for name, path in modules().items() if path.name != "__init__.py")
    assert [n for n, count in names.items() if count > 1] == []


def test_no_import_circle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if node == target.rpartition(".")[0]:
                continue  # the face importing its part
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_architecture_page_names_only_paths_that_exist():
    import re

    page = (REPO / "docs" / "architecture.md").read_text()
    table = page.split("## Where does X live", 1)[1]
    named = set(re.findall(r"`([\w./-]+/[\w./-]*)`", table))
    assert len(named) > 30
    assert [p for p in sorted(named) if not (REPO / p).exists()] == []
    # and every module of the two packages is named somewhere on the page
    modules_named = set(re.findall(r"([\w/]+\.py)", page))
    missing = [str(p.relative_to(REPO)) for pkg in ("launcher", "trainer") for p in sorted((REPO / pkg).glob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(REPO)) not in modules_named
               and p.name not in {m.rsplit("/", 1)[-1] for m in modules_named}]
    assert missing == [], "docs/architecture.md does not say where these live"
