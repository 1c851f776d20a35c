"""Checks of what `Memory`'s callers pass: users, ids, roles, times and metadata, each a one-line
UserError / BadInput naming the argument."""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mmembed.errors import BadInput, UserError, refuse_run_folder
from mmembed.memory.items import check_utf8
from mmembed.modality import Modality
from mmembed.retrieval.store import non_str_keys
from mmembed.scalars import as_integer, json_default

ROLES = ("user", "assistant")


def check_role(role: Any) -> None:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def check_user(user: Any) -> None:
    if not isinstance(user, str) or not user:
        raise UserError(f"user must be a non-empty str, got {user!r}")
    check_utf8(user, "user")


def check_model(model: Any) -> None:
    """A run folder given for `model` is refused by name: it failed later on an attribute of a str."""
    refuse_run_folder(model)


def check_list(value: Any, name: str, what: str = "items") -> list[Any]:
    """A list or tuple, as a list: a lone str would be taken apart character by character."""
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{name} must be a list of {what}; wrap one in [ ], got {type(value).__name__}")
    return list(value)


def check_ids(ids: Iterable[int] | int) -> list[int]:
    """One id, or any iterable of them (a list, a 1-D array, a set, `(h.id for h in hits)`), as
    Python ints."""
    if (n := as_integer(ids)) is not None:
        return [n]
    # not list() of anything: a str became its characters, None and a float a bare TypeError
    if (isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable)
            or (isinstance(ids, (np.ndarray, torch.Tensor)) and ids.ndim != 1)):
        raise UserError(f"ids must be an int or a list of ints, got {shown(ids)}")
    out = []
    for i in ids:  # Python's, numpy's or 0-d tensors (a tensor of ids, as `Index.search_ids` gives, iterates into them)
        if (n := as_integer(i)) is None:
            raise UserError(f"ids must be ints, got {i!r}")
        out.append(n)
    return out


def storable(ids: list[int]) -> list[int]:
    """The ids SQLite can hold (64-bit); one past that names no item: unknown, not an error."""
    return [i for i in ids if -(2**63) <= i < 2**63]


def check_optional_str(value: Any, name: str) -> None:
    if value is not None and not isinstance(value, str):
        raise UserError(f"{name} must be a str, got {value!r}")
    if value is not None:
        check_utf8(value, name)


def parse_modality(value: Modality | str) -> Modality:
    try:
        return Modality.parse(value)
    except ValueError as e:
        raise UserError(str(e)) from None


def timestamp(value: Any, name: str) -> float:
    if isinstance(value, dt.datetime):
        try:
            return value.timestamp()
        except (OverflowError, ValueError, OSError) as e:  # datetime.min and the like
            raise UserError(f"{name} {value!r} has no unix time ({e})") from None
    try:
        seconds = float(value) if is_number(value) else math.nan
    except OverflowError:  # an int past float's range
        seconds = math.nan
    if not math.isfinite(seconds):
        raise UserError(f"{name} must be unix seconds or a datetime, got {shown(value)}")
    return seconds


def check_int(value: Any, name: str, low: int, high: int | None, what: str) -> int:
    """`value` as a Python int in [low, high) (high None: no bound), numpy's integers too; else a
    UserError "`name` must be `what`"."""
    if not is_number(value, numbers.Integral) or not (low <= value and (high is None or value < high)):
        raise UserError(f"{name} must be {what}, got {shown(value)}")
    return int(value)


def shown(value: Any, width: int = 40) -> str:
    """`value`'s repr for a message, cut to `width` characters with a visible "…" (a cut number
    read as another number)."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "…"


def is_number(value: Any, kind: type = numbers.Real) -> bool:
    """A number of `kind` (numpy's scalars included), not a bool: True is not 1 second or 1 hit."""
    return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))


def meta_json(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "{}"
    if not isinstance(meta, dict):
        raise BadInput(f"meta must be a dict, got {type(meta).__name__}")
    try:
        bad = non_str_keys(meta)
    except RecursionError:  # a dict that holds itself, or nested past Python's stack
        raise BadInput("meta must be JSON-able (it holds itself or nests too deep)") from None
    if bad:  # JSON would make it a str (and 1 and "1" one key): it would not come back
        raise BadInput(f"meta has a key that is not a str: {bad[0]!r}")
    try:
        text = json.dumps(meta, ensure_ascii=False, allow_nan=False, default=json_default)  # as an index's metadata
    except (TypeError, ValueError, RecursionError) as e:  # json's depth limit is not non_str_keys's
        raise BadInput(f"meta must be JSON-able ({e})") from None
    check_utf8(text, "meta")
    return text
