"""Typed YAML: plain mappings → nested dataclasses, checked, and dotted `key.sub=value` overrides.

The machinery behind `mmembed.config` (and the scaling configs of `mmembed.insight`): nothing here
knows a schema. `from_dict` builds any dataclass from a mapping, failing on unknown keys, missing
keys and wrong types with a message that names the key and the file, then runs the dataclass's
own `check(where, source)` for the ranges a type cannot say; `check_kwargs` gives a registry's
plain builder the same checks from its signature.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import inspect
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mmembed.errors import ConfigError


class _UniqueKeys(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (plain YAML keeps the last: a second `train:`
    block would silently drop the first one's settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
        mapping = super().construct_mapping(node, deep)
        last = {self.construct_object(k, deep=deep): v for k, v in node.value}  # merged keys first, then its own
        for key, value_node in last.items():
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null") and value_node.value == "":
                mapping[key] = EMPTY
        return mapping


class _Empty:
    """A key given no value (`decoder:` alone, perhaps with comments under it). YAML reads it as
    null, which skipped the decoder stage the README says a `decoder:` section adds: under a
    section's key it is that section with its defaults, elsewhere null (`coerce`). An explicit
    `null` or `~` stays null."""

    def __repr__(self) -> str:
        return "null"


EMPTY = _Empty()


class _Typed:
    """An override's value that YAML read as a number, a date or a boolean, with the text typed.
    A str field takes the text: `train.out_dir=2024-06-01` was refused as a date, and `"2024"`
    reached us as 2024 (the shell strips the quotes). Any other field takes YAML's value."""

    def __init__(self, value: Any, text: str) -> None:
        self.value, self.text = value, text

    def as_str(self, key: str, source: str) -> str:
        if isinstance(self.value, bool):  # `false` for a path or a name more likely means "none" than the text
            raise ConfigError(f"{source}: {key} must be str, got bool {self.value!r} (YAML reads {self.text} as "
                              f"a boolean: for the text, quote it: {key}='\"{self.text}\"')")
        return self.text


def read_mapping(path: Path) -> dict:
    """The YAML mapping in `path` (an empty file is an empty mapping)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return _plain(raw)
    except RecursionError:
        raise ConfigError(f"{path}: an alias (*name) refers to the mapping or list it is in") from None


def _plain(value: Any, empty: Any = EMPTY) -> Any:
    """A tree of its own (not copy.deepcopy: its memo keeps shared objects shared). A YAML alias
    (`train: *tr` under decoder) is the anchor's own object, so an override of one section
    (decoder.train.lr) changed the other too, and config.yaml recorded it."""
    if isinstance(value, dict):
        return {k: _plain(v, empty) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, empty) for v in value]
    if isinstance(value, _Typed):
        return value.value
    return empty if value is EMPTY else value


def apply_override(raw: dict, item: str, source: str = "override") -> None:
    """`train.lr=3e-4` sets raw["train"]["lr"]; the value is parsed as YAML (`[1, 2]`, `null`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) in (None, EMPTY):  # absent, or set to null (`decoder=null`, an empty `decoder:`): made anew
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section in {source}")
        node = child
    if re.search(r"\s#", value) and value.strip()[:1] not in ("'", '"'):
        raise ConfigError(f"override {key}: YAML reads ' #' in {value!r} as the start of a comment; quote the "
                          f"value ({key}='\"{value.strip()}\"') or write it without the space")
    if not value.strip():  # `decoder=`: as YAML's key given no value, a section's defaults (else null)
        node[parts[-1]] = EMPTY
        return
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot parse value {value!r}") from None
    node[parts[-1]] = _Typed(parsed, value.strip()) if _is_scalar(parsed) else parsed


def _is_scalar(value: Any) -> bool:
    """What YAML reads as other than text, null or a collection (bool is an int)."""
    return isinstance(value, (int, float, datetime.date))


def to_dict(obj: Any) -> Any:
    """Dataclass → plain YAML-able structures (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):  # a Path set from Python (cfg.train.out_dir = Path(...))
        return os.fspath(obj)
    return obj


def from_dict(cls: type, raw: Any, where: str, source: str) -> Any:
    """Build dataclass `cls` from `raw`, failing on unknown keys, missing keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {_typename(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be bools or ints (`on:`, `1:`)
    if unknown:
        key = join_key(where, unknown[0])
        raise ConfigError(f"{source}: unknown key {key!r} (valid: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = join_key(where, name)
        if name in raw:
            value = _filled(hints[name], raw[name])
            if (check_key := f.metadata.get("key_check")) is not None and isinstance(value, dict):
                for k in value:  # those set to null too: `coerce` drops them, and a misspelt one would go unseen
                    check_key(k, join_key(key, str(k)), source)
            if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                # a partial section keeps the field's own defaults (decoder.train is not TrainConfig())
                default = f.default_factory()
                if dataclasses.is_dataclass(default):
                    value = _merged(to_dict(default), value)
            kwargs[name] = coerce(hints[name], value, key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {key!r}")
    try:
        built = cls(**kwargs)
    except ConfigError as e:  # a __post_init__ range check names its key, not the file
        raise ConfigError(sourced(str(e), source)) from None
    if hasattr(built, "check"):  # ranges the types cannot say
        built.check(where, source)
    return built


def sourced(message: str, source: str) -> str:
    """`message` led by the file it is about, once (a message may already name it)."""
    return message if not source or message.startswith(f"{source}:") else f"{source}: {message}"


def coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type annotation `tp`; ints are accepted where floats are expected."""
    value = _filled(tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _plain(value, empty=None)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if isinstance(value, _Typed):  # under a union each option decides: `str | None` takes the text
        if tp is str:
            return value.as_str(key, source)
        value = value.value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, source)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {_typename(value)}")
        ktp, vtp = args or (Any, Any)
        if dataclasses.is_dataclass(vtp):  # sections by name (towers): one set to null is left out, as a section is
            value = {k: v for k, v in value.items() if v is not None}
        return {coerce(ktp, k, key, source): coerce(vtp, v, join_key(key, str(k)), source) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {_typename(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {len(value)}")
            return tuple(coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return origin(coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; every user writes learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        # `tokens=2e5`, `max_steps=1e4`: YAML reads 2e5 as a string, 2.0e5 as a float; a whole number is an int
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if number.is_integer() and (isinstance(value, float) or "e" in value.lower()):
            return int(number)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            got = "null" if value is None else f"{_typename(value)} {value!r}"
            raise ConfigError(f"{source}: {key} must be {tp.__name__}, got {got}"
                              + (_quote_hint(key, value) if tp is str else ""))
        return value
    return value


def check_kwargs(fn: Any, kwargs: dict[str, Any], where: str, source: str = "config") -> dict[str, Any]:
    """Validate `kwargs` against the signature of `fn` (a class or function) before calling it.

    Registries map names to plain builders; this is how their YAML blocks get the same
    unknown-key and wrong-type errors as the dataclasses above.
    """
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    valid = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {}
    for name, value in kwargs.items():
        if name not in valid:
            raise ConfigError(f"{source}: unknown key {join_key(where, name)!r} (valid: {', '.join(valid)})")
        out[name] = coerce(hints.get(name, Any), value, join_key(where, name), source)
    return out


def _filled(tp: Any, value: Any) -> Any:
    """A key given no value: the section with its defaults where `tp` is a section (a dataclass,
    or one or null) whose every field has one, else null (a bare `data_size:` of a scaling
    config, whose fields have none, was refused as missing 'data_size.width')."""
    if value is not EMPTY:
        return value
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return {} if any(dataclasses.is_dataclass(a) and _all_defaulted(a) for a in options) else None


def _quote_hint(key: str, value: Any) -> str:
    """For a YAML file's `out_dir: 2024` (or a date, or `yes`): text must be quoted there."""
    if not _is_scalar(value):
        return ""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    name = key.rpartition(".")[2]
    return f' (quote it: {name}: "{text}")' if name.isidentifier() else f' (quote it: "{text}")'


def _all_defaulted(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML error: what and where (PyYAML's own text spans four lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(f"{e.__class__.__name__}: {e}".split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def join_key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__
