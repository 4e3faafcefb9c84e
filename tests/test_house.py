"""The house's shape, checked: no two modules share a name; no two parts of the project import
each other, directly or round a longer circle, not even lazily inside a function (a package's
face importing its own parts is what a face is for); the worker library never imports the driver;
and code outside a role package of `trainer/` reaches it through its face, never its modules."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from conftest import REPO

PACKAGES = ("launcher", "trainer")
# trainer/'s role packages: each offers names through the face in its __init__.py (trainer/face.py)
ROLES = ("data", "model", "versions", "control", "evaluation", "inference", "tasks")


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
            out |= {f"{base}.{face_module(base, a.name)}" for a in node.names if face_module(base, a.name)}
    return {m for m in out if m in known and m != name}


def face_module(package: str, name: str) -> str | None:
    """The module a role package's face takes `name` from: an import through a face is an edge to
    that module, so a circle through a face is still a circle."""
    import importlib

    if package.split(".")[:1] != ["trainer"] or package.count(".") != 1 or package.split(".")[1] not in ROLES:
        return None
    return importlib.import_module(package).__getattr__.module_of.get(name)


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


def project_imports(path: Path):
    """(line, module, names) of each `from trainer... import` and `import trainer...` in `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def test_the_worker_library_never_imports_the_driver():
    """Dependencies point one way: launcher/ (driver) -> trainer/ (worker library)."""
    offenders = [f"{path.relative_to(REPO)}:{line} {module}" for path in (REPO / "trainer").rglob("*.py")
                 for line, module, _ in project_imports(path) if module.split(".")[0] == "launcher"]
    assert not offenders, offenders


def face_offenders(path: Path, root: Path = REPO) -> list[str]:
    """Imports in `path` that reach into a role package it is not part of, past the package's face."""
    import importlib

    parts = path.relative_to(root).parts
    home = parts[1] if parts[0] == "trainer" and len(parts) > 2 else None
    offenders = []
    for line, module, names in project_imports(path):
        segs = module.split(".")
        if segs[0] != "trainer" or len(segs) < 2 or segs[1] not in ROLES or segs[1] == home:
            continue
        where = f"{path.relative_to(root)}:{line}"
        if len(segs) > 2:
            offenders.append(f"{where} imports {module}, inside trainer.{segs[1]}")
            continue
        offered = set(importlib.import_module(module).__all__)
        offenders += [f"{where} imports {n}, which trainer.{segs[1]} does not offer" for n in names if n not in offered]
    return offenders


def test_code_outside_a_role_package_uses_its_face_only():
    """`from trainer.versions import open_storage`, never `from trainer.versions.storage import ...`,
    for launcher/, benchmarks/ and the rest of trainer/; tests may reach a module they test."""
    found = [path for pkg in (*PACKAGES, "benchmarks") for path in sorted((REPO / pkg).rglob("*.py"))]
    offenders = [o for path in found for o in face_offenders(path)]
    assert offenders == []


def test_the_face_check_catches_a_module_reached_past_its_face(tmp_path):
    """The check above can fail: a launcher module reaching into trainer/versions/storage.py, or
    asking the face for a name it does not offer, is named with its line."""
    bad = tmp_path / "launcher" / "probe.py"
    bad.parent.mkdir()
    bad.write_text("from trainer.versions.storage import open_storage\nfrom trainer.model import gpu_count\n"
                   "from trainer.model import build_model\n")
    assert face_offenders(bad, root=tmp_path) == [
        "launcher/probe.py:1 imports trainer.versions.storage, inside trainer.versions",
        "launcher/probe.py:2 imports gpu_count, which trainer.model does not offer"]


def test_every_role_package_offers_what_it_names():
    """Each name a face lists resolves, is the object its module defines, and is cached after the
    first look-up; an unknown name is an AttributeError, as for any module."""
    import importlib

    import pytest

    from trainer.face import face

    for role in ROLES:
        package = importlib.import_module(f"trainer.{role}")
        assert package.__all__, role
        for name in package.__all__:
            value = getattr(package, name)
            assert value is not None and name in vars(package), (role, name)
        with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
            package.not_a_name  # noqa: B018
    from trainer.versions import open_storage
    from trainer.versions.storage import open_storage as defined

    assert open_storage is defined
    with pytest.raises(ValueError, match="name both a module and a name"):
        face("trainer.versions", {"scratch": ("storage",), "storage": ("open_storage",)})


def test_the_architecture_page_names_only_paths_that_exist():
    import re

    page = (REPO / "docs" / "architecture.md").read_text()
    table = page.split("## Where does X live", 1)[1]
    named = set(re.findall(r"`([\w./-]+/[\w./-]*)`", table))
    assert len(named) > 30
    assert [p for p in sorted(named) if not (REPO / p).exists()] == []
    # and every module of the two packages is named somewhere on the page
    modules_named = set(re.findall(r"([\w/]+\.py)", page))
    missing = [str(p.relative_to(REPO)) for pkg in ("launcher", "trainer") for p in sorted((REPO / pkg).rglob("*.py"))
               if p.name != "__init__.py" and str(p.relative_to(REPO)) not in modules_named
               and p.name not in {m.rsplit("/", 1)[-1] for m in modules_named}]
    assert missing == [], "docs/architecture.md does not say where these live"
