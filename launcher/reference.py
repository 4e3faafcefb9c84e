"""The job spec reference, generated from the typed tree and the task registry.

`mtl schema` prints it; docs/reference.md embeds it (a test keeps the two equal), so the
documentation cannot drift from what the validator accepts.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.jobfile import model_in
from trainer.spec import JobSpec
from trainer.tasks import registry

BEGIN = "<!-- BEGIN GENERATED: mtl schema -->"
END = "<!-- END GENERATED: mtl schema -->"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (
            " \\| null" if type(None) in args else "")
    if origin is dict:
        return f"map {_type_name(args[0])} → {_type_name(args[1])}"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    return f"`{field.default}`" if field.default is not None else "`null`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        rows.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
        nested = model_in(field.annotation)
        if nested is not None:
            rows.extend(_rows(nested, f"{path}.<name>." if typing.get_origin(field.annotation) is dict else f"{path}."))
    return rows


def markdown() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|", *_rows(JobSpec, "")]
    lines += ["", "Task types (`tasks.<name>.type`) and their fields, metrics and `options`:", ""]
    for name in registry.names():
        t = registry.get(name)
        fields = ", ".join(f"`{f}`" + ("" if f in t.required else " (optional)") for f in t.fields)
        lines.append(f"- **{name}** — {t.description} Fields: {fields}. Models: {', '.join(t.model_kinds)}. "
                     f"Metrics: {', '.join(t.allowed_metrics)} (default {', '.join(t.default_metrics)}). "
                     f"Default prompt: `{t.default_prompt}` (a prompt may use `{{task}}`, "
                     + ", ".join(f"`{{{f}}}`" for f in t.prompt_fields) + ").")
        for key, f in t.options_model.model_fields.items():
            lines.append(f"  - `options.{key}` (default `{f.default}`): {f.description}")
    return "\n".join(lines) + "\n"


def update_readme(path: str = "docs/reference.md") -> None:
    """Replace the generated block of docs/reference.md with the current reference."""
    text = open(path).read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as fh:
        fh.write(f"{head}{BEGIN}\n{markdown()}{END}{tail}")


if __name__ == "__main__":
    update_readme()
