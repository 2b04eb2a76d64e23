"""Recipes: YAML files read into typed dataclasses, with ``key=value`` overrides from the CLI.

A recipe names its ``task`` (which schema it follows); every other key must exist in that
schema. An unknown key is rejected with the nearest valid one, so a typo never silently falls
back to a default. The resolved config is written next to the run's outputs: it is the record
of what ran.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from xmodal.errors import ConfigError

RECIPE_SUFFIX = ".yaml"


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars, for recipes and ``key=value`` overrides.

    PyYAML follows YAML 1.1, where a bare ``no``/``off``/``yes``/``on`` is a boolean (so
    ``mixed_precision: no`` would read as False) and ``1e-4`` is a string (no dot). Here only
    ``true``/``false`` are booleans and ``1e-4`` is a number.
    """


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YamlLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
  | [-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
  | [-+]?\.(?:inf|Inf|INF)
  | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``text`` parsed with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)


# ----------------------------------------------------------------- recipe files
def recipe_dir() -> Path:
    """The folder holding the built-in recipes (the top-level ``recipes`` package)."""
    return Path(str(resources.files("recipes")))


def available_recipes() -> dict[str, str]:
    """Built-in recipe names and their one-line descriptions."""
    out = {}
    for path in sorted(recipe_dir().glob(f"*{RECIPE_SUFFIX}")):
        data = load_yaml(path.read_text()) or {}
        out[path.stem] = str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
    return out


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a built-in recipe (by name) or of a YAML file (by path)."""
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a folder; give a recipe name or a YAML file")
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = recipe_dir() / f"{name_or_path}{RECIPE_SUFFIX}"
        if not path.exists():
            names = list(available_recipes())
            near = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown recipe {name_or_path!r}{hint} Available: {', '.join(names)}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a text file (not UTF-8); a recipe is YAML text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a mapping of keys, got {type(data).__name__}")
    data.setdefault("recipe", path.stem)
    return data


# ------------------------------------------------------------------ overrides
def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "data=stl10"]`` -> ``[("a.b", 3), ("data", "stl10")]`` (values parsed as YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``, creating mappings on the way.

    A name given to a section that has one (``data=imagefolder``) switches its ``name`` and keeps
    the section's other keys (splits, subsets, quick=true's sizes); only ``options``, which belong
    to the dataset or modality named before, are dropped when the name changes. Likewise an
    ``arch`` from another library (``student.arch=tv:resnet18`` where the recipe names xmodal's
    ``resnet8``) drops the model's ``options`` (``width`` means nothing to torchvision); set
    ``<model>.options`` after it to give the new one's. Within one library they are kept
    (``efficientnet_lite0`` -> ``efficientnet_lite1`` keeps ``pretrained``). A number names an
    entry of a list: ``teachers.1.train.epochs=0``.
    """
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # "teachers.1.train.epochs": the second entry of a list
            node = node[_position(node, part, ".".join(parts[:i]))]
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is {node!r}, not a mapping")
            continue
        child = node.get(part)
        if parts[i + 1].isdigit() and not isinstance(child, list):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is {child!r}, not a list; a number "
                              "names an entry of a list")
        if isinstance(child, str):  # "data: stl10" shorthand followed by "data.root=..."
            child = {"name": child}
        elif not isinstance(child, (dict, list)):
            child = {}
        node[part] = child
        node = child
    if isinstance(node, list):
        node[_position(node, parts[-1], ".".join(parts[:-1]))] = value
        return
    current = node.get(parts[-1])
    if parts[-1] == "arch" and isinstance(node.get("options"), dict) and _library(current) != _library(value):
        node.pop("options")
    if isinstance(value, str) and isinstance(current, dict) and "name" in current:
        switched = {k: v for k, v in current.items() if k != "options" or current["name"] == value}
        node[parts[-1]] = {**switched, "name": value}
        return
    node[parts[-1]] = value


def _position(items: list, part: str, where: str) -> int:
    """The list index ``part`` names in an override (``teachers.1...``), checked."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override of {where}.{part}: {where} lists {len(items)} entries; "
                          f"name one by its position 0..{len(items) - 1}")
    return int(part)


def _library(arch: Any) -> str:
    """``timm`` of ``timm:resnet18``, ``tv`` of ``tv:resnet18``, ``""`` of xmodal's own names."""
    return arch.split(":", 1)[0] if isinstance(arch, str) and ":" in arch else ""


# ------------------------------------------------------------ typed structure
def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        sub = _dataclass_of(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_valid_keys(sub, prefix + f.name + "."))
    return keys


def _dataclass_of(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _finite(value: Any, key: str) -> Any:
    """``value`` (a free-form option such as a loss's), once no number in it is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    return value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return _finite(value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no recipe number means anything as NaN or infinity
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: Any, prefix: str = "", root: Optional[type] = None) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise with the nearest valid key."""
    root = root or cls
    if isinstance(data, str) and "name" in {f.name for f in dataclasses.fields(cls)}:
        data = {"name": data}  # "data: stl10" means data.name = stl10
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            full = prefix + str(key)
            if key in getattr(cls, "renamed", {}):
                raise ConfigError(f"recipe key {full!r} is now {cls.renamed[key]!r}")
            valid = _valid_keys(root)
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown recipe key {full!r}{hint}")
        sub = _dataclass_of(hints[key])
        if sub is not None and (isinstance(value, (dict, str)) or value is None) and not (value is None and type(None) in typing.get_args(hints[key])):
            kwargs[key] = from_dict(sub, value, prefix + key + ".", root)
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain mappings (for YAML/JSON)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


#: Field metadata for what changes no result (DataLoader workers, the batch size of a test pass,
#: pictures) or is a report about a stage rather than part of it: :func:`identity` leaves it out.
NOT_IDENTITY = {"identity": False}
#: Field metadata for a key added after stages were first recorded: part of an identity only when
#: set, so folders written before it existed still resume.
IDENTITY_IF_SET = {"identity": "if_set"}


def identity(obj: Any) -> Any:
    """:func:`to_dict` of ``obj`` without the fields marked :data:`NOT_IDENTITY` (and those marked
    :data:`IDENTITY_IF_SET` while ``None``): what a stage trained from this config records as its
    identity, so an unchanged stage is reloaded and a changed one refused."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            mode, value = f.metadata.get("identity", True), getattr(obj, f.name)
            if mode is False or (mode == "if_set" and value is None):
                continue
            out[f.name] = identity(value)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(identity(v) for v in obj)
    if isinstance(obj, dict):
        return {k: identity(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


#: Tasks of earlier versions and what a recipe names instead.
RETIRED_TASKS = {"rgbd": "task 'transfer' with protocols: [segmentation] and teacher.train.epochs: 0 "
                         "(see recipes/nyu-rgb2depth.yaml)",
                 "ensemble": "task 'transfer' with teachers: M (copies of teacher) or a list, and protocols: [test] "
                             "(see recipes/ensemble-cifar.yaml)"}


def _unshared(node: Any) -> Any:
    """A copy in which no two places hold one mapping or list: entries a YAML anchor shares
    (``teachers[1]`` made from ``teachers[0]``) then take overrides apart (``copy.deepcopy``
    would keep them shared)."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    return [_unshared(v) for v in node] if isinstance(node, list) else node


def resolve(recipe: str, overrides: list[str], schemas: dict[str, type]) -> Any:
    """Read ``recipe``, apply its quick block if ``quick=true``, then the overrides; type it.

    Args:
        recipe: a built-in recipe name or a YAML path.
        overrides: ``key=value`` strings, dotted keys for nested sections.
        schemas: task name -> dataclass of that task's config.
    """
    data = _unshared(read_recipe(recipe))
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        if key == "quick":
            data["quick"] = value
    quick_block = data.pop("quick_overrides", {}) or {}
    if not isinstance(quick_block, dict):
        raise ConfigError(f"quick_overrides of recipe {recipe!r} must be a mapping of keys to values, "
                          f"got {type(quick_block).__name__}")
    if _coerce(data.get("quick", False), bool, "quick"):
        for key, value in quick_block.items():
            set_dotted(data, key, value)
    for key, value in parsed:
        set_dotted(data, key, value)
    task = data.get("task")
    if task not in schemas:
        now = f", which is now {RETIRED_TASKS[task]}" if task in RETIRED_TASKS else ""
        raise ConfigError(f"recipe {recipe!r} has task {task!r}{now}; expected one of {sorted(schemas)}")
    cfg = from_dict(schemas[task], data)
    for seed in [cfg.seed, *(cfg.seeds or [])]:
        if not 0 <= seed < 2**32:  # what numpy's and Python's generators take
            raise ConfigError(f"seed {seed}: expected a seed in 0 .. 2**32 - 1")
    return cfg
