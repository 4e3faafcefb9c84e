"""Reading a job: YAML + dotted `key=value` overrides -> a validated, resolved JobSpec.

Errors from the typed tree are rewritten for people: the dotted field, what is wrong, and
for a typo the closest valid key or value.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

import ds_configs

from trainer.spec import JobSpec
from trainer.errors import SpecError, UserError, did_you_mean

SHIPPED_DS_CONFIGS = Path(ds_configs.__file__).resolve().parent  # package data: found wherever mtl runs


class JobErrors(UserError):
    """Several spec errors at once, one per line."""

    def __init__(self, source: str, errors: list[str]):
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error{'s' if len(errors) > 1 else ''}\n"
                         + "\n".join(f"  - {e}" for e in errors))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['train.steps=20', 'tasks.a.weight=2'] -> nested dict; values are read as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' must look like dotted.key=value (e.g. train.steps=20)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise UserError(f"override '{item}': cannot read the value: {exc}") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' conflicts with another override of '{part}'")
        node[leaf] = value
    return tree


def merge(base: dict, overrides: dict, path: str = "") -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{path}{key}.")
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    try:
        with open(path) as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise UserError(f"job file not found: '{path}'") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a job file must be a YAML mapping (name:, model:, tasks:, ...)")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word; a job that names a task twice
    (a copy-paste slip) would silently lose one."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' appears twice in the same mapping (first on line {seen[key] + 1}); "
                    "YAML would keep only the last one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_job(path: str, overrides: list[str] | None = None, *, resolve_paths: bool = True) -> JobSpec:
    base, changes = read_yaml(path), parse_overrides(overrides or [])
    _check_task_overrides(base, changes, path)
    raw = merge(base, changes)
    spec = parse_job(raw, source=path)
    return resolve(spec) if resolve_paths else spec


def _check_task_overrides(base: dict, changes: dict, path: str) -> None:
    """An override of a task the file does not have is a typo unless it defines the task whole."""
    known = list((base.get("tasks") or {}) if isinstance(base.get("tasks"), dict) else [])
    for name, value in (changes.get("tasks") or {}).items():
        if name in known or (isinstance(value, dict) and {"type", "data"} <= set(value)):
            continue
        close = [t for t in known if t.lower() == name.lower()] or known
        raise UserError(f"override tasks.{name}: {path} has no task '{name}'{did_you_mean(name, close)}; "
                        f"its tasks: {', '.join(known) or 'none'}")


def parse_job(raw: dict, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobErrors(source, [_describe(err, raw) for err in exc.errors()]) from None


def _describe(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "job"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        return f"{where}: unknown key{did_you_mean(key, _fields_at(parent))}" + _valid_keys(parent)
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "literal_error":
        expected = [v.strip().strip("'") for v in err["ctx"]["expected"].replace(" or ", ", ").split(",")]
        return f"{where}: '{err['input']}' is not one of {', '.join(expected)}{did_you_mean(str(err['input']), expected)}"
    message = err["msg"].removeprefix("Value error, ").removeprefix(": ")
    return f"{where}: {message}" + (f" (got {err['input']!r})" if kind not in ("value_error", "assertion_error")
                                      and not isinstance(err.get("input"), dict) else "")


def _valid_keys(parent: list[str]) -> str:
    keys = _fields_at(parent)
    return f"; valid keys: {', '.join(keys)}" if keys else ""


def _fields_at(loc: list[str]) -> list[str]:
    """The field names valid at a location in the tree (dict keys like task names are skipped)."""
    node: Any = JobSpec
    for part in loc:
        node = model_in(node)
        if node is None:
            return []
        if part in node.model_fields:
            node = node.model_fields[part].annotation
        else:  # a dict key, e.g. a task name: step into the dict's value type
            node = _dict_value(node)
    model = model_in(node)
    return list(model.model_fields) if model else []


def model_in(tp: Any):
    """The pydantic model class inside an annotation (X, X | None, dict[str, X]), or None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def _dict_value(tp: Any):
    args = typing.get_args(tp)
    return args[1] if len(args) == 2 else tp


def resolve(spec: JobSpec) -> JobSpec:
    """Relative paths become absolute (against the current folder), so workers anywhere find them."""
    spec = spec.model_copy(deep=True)
    spec.deepspeed = resolve_ds_config(spec.deepspeed)
    for name, task in spec.tasks.items():
        for key in ("train", "validation", "test", "path"):
            value = getattr(task.data, key)
            if value and "://" in value:  # would become /cwd/s3:/... below
                raise SpecError(f"tasks.{name}.data.{key}", f"'{value}': data is read from files on a local or shared "
                                "(NFS) path, or from the hub by name; copy it from object storage to a path every "
                                "node sees (storage.path may be s3://, data may not)")
            if value:
                setattr(task.data, key, os.path.abspath(os.path.expanduser(value)))
    if _local_path(spec.model.name_or_path):
        spec.model.name_or_path = os.path.abspath(os.path.expanduser(spec.model.name_or_path))
    if "://" not in spec.storage.path:
        spec.storage.path = os.path.abspath(os.path.expanduser(spec.storage.path))
    return spec


def resolve_ds_config(value: str) -> str:
    """A shipped config by bare name ('zero2'), else a path."""
    shipped = SHIPPED_DS_CONFIGS / f"{value}.json"
    bare = "/" not in value and not value.endswith(".json")
    if bare and shipped.exists():
        return str(shipped)
    path = os.path.abspath(os.path.expanduser(value))
    if bare and not os.path.exists(path):
        names = shipped_ds_configs()
        raise SpecError("deepspeed", f"'{value}' is neither a shipped config ({', '.join(names)}) nor a file"
                                     f"{did_you_mean(value, names)}")
    return path


def shipped_ds_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DS_CONFIGS.glob("*.json"))


def _local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(name)


def dump_job(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
