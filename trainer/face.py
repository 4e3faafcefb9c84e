"""A role package's face: the names it offers, each loaded from its module on first use.

Each package under `trainer/` (data, model, versions, ...) says in its `__init__.py` what it offers
the rest of the project, and code outside the package imports those names from the package
(`from trainer.versions import open_storage`), never from the module inside it
(`tests/test_house.py` checks). The face is lazy (PEP 562) for two reasons:

- the packages use each other both ways at module level (a version's reader builds a model, the
  model's loader reads the version's files): an eager face would import a package in the middle
  of importing another, and whether a name was bound yet would depend on import order;
- `mtl --help` loads no heavy library, and a package whose face imported every part would load
  torch for a name that needs none.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable


def face(package: str, offers: dict[str, tuple[str, ...]],
         modules: tuple[str, ...] = ()) -> tuple[Callable, Callable, list[str]]:
    """`(__getattr__, __dir__, __all__)` for `package`: `offers` maps each of its modules to the
    names it lends the face; `modules` are parts offered whole, as a namespace."""
    where = {name: module for module, names in offers.items() for name in names}
    clash = sorted(set(where) & (set(offers) | set(modules)))
    if clash:  # Python binds a submodule's name on its package once it is imported: one would hide the other
        raise ValueError(f"{package}: {clash} name both a module and a name it offers")

    def __getattr__(name: str):
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # the next lookup is a plain attribute
        return value

    __getattr__.module_of = {**where, **{m: m for m in modules}}  # for the house's checks (tests/test_house.py)
    names = sorted([*where, *modules])
    return __getattr__, lambda: names, names
