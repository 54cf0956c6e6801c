"""Typed settings for every verb: one builder from YAML + dotted overrides to a checked dataclass.

Any settings dataclass (``TrainConfig`` in ``memreason.train.config``, ``EvalSettings``, ``SweepConfig``, ``RebalanceSettings``,
``AblationConfig``, ...) is built the same way by ``load_settings(cls, path, overrides)``:

* a YAML file whose keys mirror the dataclass (nested dataclass fields are sections); anything left out
  takes the default written once, on the dataclass;
* ``defaults: base.yaml`` (or a list) includes other files first, resolved beside the including file, so a
  variant states only its difference (nanoGPT's presets);
* dotted ``key=value`` overrides on top, read as the type each key declares;
* every unknown key, wrong type, non-finite number and range error is collected and raised as one
  ``ConfigError`` listing them all (torchtune's ``_validate``), before any model is loaded.

Usage::

    cfg = load_config("configs/demo.yaml", ["optim.epochs=1", "output_dir=runs/try"])
    save_config(cfg, run_dir / "config.yaml")      # the resolved recipe travels with every run
    sweep = load_settings(SweepConfig, "configs/inject/sweep.yaml", ["taus=[2,4]"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

from memreason.errors import ConfigError


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass, with a type check per key; problems are collected, then raised together


class _Problems(list):
    """Config problems found so far (one line each); ``raise_if_any`` turns them into one ConfigError."""

    def raise_if_any(self, source: str | None = None) -> None:
        if not self:
            return
        where = f"{source}: " if source else ""
        if len(self) == 1:
            raise ConfigError(f"{where}{self[0]}")
        raise ConfigError(f"{where}{len(self)} config errors: " + "; ".join(self))


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


_NULLS = ("null", "none", "~", "")


def _coerce(value: Any, tp, key: str, from_text: bool) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form.

    ``from_text`` is True for command-line overrides, whose values arrive as strings (lists as YAML flow
    sequences: ``layers=[3,5]``).

    Raises:
        ConfigError: naming ``key``, the expected type and the value received.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (from_text and str(value).strip().lower() in _NULLS)):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, from_text)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}")
    if origin in (list, tuple):
        return _coerce_sequence(value, tp, key, from_text)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string; accept any float literal
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user input


def _coerce_sequence(value: Any, tp, key: str, from_text: bool):
    if from_text and isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError:
            raise ConfigError(f"{key}: expected {_type_name(tp)} such as [1, 2], got {value!r}") from None
        if not isinstance(value, list):
            value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    items = [_coerce(v, args[0], f"{key}[{i}]", from_text) for i, v in enumerate(value)] if args else list(value)
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls, key, prefix: str) -> str:
    names = list(_fields(cls))
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"unknown config key {prefix + str(key)!r}{hint}; known keys here: {', '.join(names)}"


def _check_tree(cls, data: Any, prefix: str, from_text: bool, problems: _Problems) -> dict:
    """The checked, coerced subset of ``data`` for ``cls``; every problem is appended, none raised."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
        return {}
    fields = _fields(cls)
    out = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            problems.append(_unknown_key(cls, key, prefix))
            continue
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            if from_text and not isinstance(value, dict):
                first = dataclasses.fields(tp)[0].name
                problems.append(f"{full} is a section; set one of its keys, e.g. {full}.{first}=...")
                continue
            out[key] = _check_tree(tp, value, f"{full}.", from_text, problems)
            continue
        try:
            out[key] = _coerce(value, tp, full, from_text)
        except ConfigError as exc:
            problems.append(str(exc))
    return out


def _instantiate(cls, tree: dict, prefix: str, problems: _Problems):
    """``cls`` from a checked tree; a dataclass that checks itself (``__post_init__``) adds its problem."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in tree.items():
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            value = _instantiate(tp, value, f"{prefix}{key}.", problems)
            if value is None:  # the section's own problem is recorded; its default stands in
                continue
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        problems.append(f"{prefix.rstrip('.')}: {exc}" if prefix else str(exc))
    except TypeError as exc:  # a required field without default
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {exc}")
    return None


def _build(cls, data: Any, prefix: str = "", from_text: bool = False):
    """Build dataclass ``cls`` from a (possibly partial) mapping, checking every key and value.

    Raises:
        ConfigError: listing every problem found.
    """
    if isinstance(data, cls):
        return data
    problems = _Problems()
    tree = _check_tree(cls, data, prefix, from_text, problems)
    problems.raise_if_any()
    cfg = _instantiate(cls, tree, prefix, problems)
    problems.raise_if_any()
    return cfg


def config_to_dict(cfg) -> dict:
    """A plain dict (YAML/JSON-ready) of a settings dataclass, nested sections included."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: str, problems: _Problems) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"override {dotted!r}: {part!r} is not a section")
            return
        node = child
    node[parts[-1]] = value


def _deep_update(base: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping in a YAML settings file, with its ``defaults:`` includes merged in first.

    Raises:
        ConfigError: missing, unreadable, empty or not a mapping, invalid YAML (with line and column), or
            an include cycle.
    """
    import yaml

    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'defaults' includes form a cycle ({' -> '.join(str(p) for p in _seen)})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if tree is None:
        raise ConfigError(f"config file {path} is empty; set at least one key (or leave out --config)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(tree).__name__}")
    includes = tree.pop("defaults", None)
    if includes is None:
        return tree
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'defaults' must be a file name or a list of file names")
    merged: dict = {}
    for include in includes:
        _deep_update(merged, read_yaml_tree(path.parent / include, _seen + (path.resolve(),)))
    _deep_update(merged, tree)
    return merged


def load_settings(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                  validate: Callable[[Any], list[str]] | None = None, base: dict | None = None):
    """A checked ``cls`` from a YAML file, dotted overrides and the dataclass's defaults.

    Args:
        cls: a settings dataclass (nested dataclass fields are sections).
        path: a YAML file (``defaults:`` includes allowed), or ``None`` for the defaults.
        overrides: ``"key=value"`` strings (``"optim.lr=1e-4"``, ``"layers=[3,5]"``, ``"val_size=null"``).
        validate: range and cross-field checks that return a list of problems (empty when fine).
        base: values applied before the file (a verb's own defaults for its flags).

    Raises:
        ConfigError: every problem at once: file, YAML, unknown keys, types, non-finite numbers, ranges.
    """
    problems = _Problems()
    tree: dict = dict(base or {})
    if path is not None:
        _deep_update(tree, _check_tree(cls, read_yaml_tree(path), "", False, problems))
    text_tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not of the form key=value")
            continue
        _set_dotted(text_tree, key.strip(), value.strip(), problems)
    _deep_update(tree, _check_tree(cls, text_tree, "", True, problems))
    cfg = _instantiate(cls, tree, "", problems)
    # Keys that failed their type check were left out (their defaults stand in), so the range checks
    # still run and every problem is reported in one go.
    if cfg is not None and validate is not None:
        problems.extend(validate(cfg))
    problems.raise_if_any()
    return cfg


def save_settings(cfg, path: str | Path) -> None:
    """Write resolved settings as YAML (loadable again with ``load_settings``)."""
    import yaml

    from memreason.io import atomic_write

    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
