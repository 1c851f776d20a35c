"""Numbers as users pass them: Python's, numpy's (np.int64 from an array), or 0-d tensors
(`t.max()`, `torch.tensor(0.7)`), read as one plain int or float before a value is checked, so
that every argument of the API takes every kind of number and refuses the rest in one line."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_integer(value: object) -> int | None:
    """`value` as an int when it is an integer of any type (a numpy integer, a 0-d integer array or
    tensor: `np.load(f)["n"]`, `t.argmax()`), not a bool; else None."""
    if isinstance(value, Tensor):
        whole = value.ndim == 0 and not (value.dtype == torch.bool or value.is_floating_point() or value.is_complex())
        return int(value) if whole else None
    if isinstance(value, np.ndarray):
        return int(value) if value.ndim == 0 and value.dtype.kind in "iu" else None
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def as_real(value: object) -> object:
    """A real number of any type (numpy's, a 0-d tensor: torch.tensor(0.5) was refused as "not a
    finite number >= 0") as a float; anything else (a bool, a 1-D tensor) as it is, for the checks."""
    if isinstance(value, Tensor):
        real = value.ndim == 0 and not (value.dtype == torch.bool or value.is_complex())
        return float(value) if real else value
    if isinstance(value, np.ndarray):  # a 0-d array: np.array(0.7), np.load(f)["t"]
        return float(value) if value.ndim == 0 and value.dtype.kind in "iuf" else value
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)) else value


def json_default(value: Any) -> Any:
    """`json.dumps`'s `default=` for what users put in metadata: a Path as its str, a 0-d tensor or a
    numpy scalar as its number; TypeError for the rest (a tensor or array of any other shape too)."""
    if isinstance(value, Path):
        return str(value)
    shape = getattr(value, "shape", None)  # a tensor or numpy array: only a 0-d one (a scalar) is a number
    if shape is not None and tuple(shape):
        raise TypeError(f"{type(value).__name__} of shape {tuple(shape)} is not JSON-serialisable "
                        "(a list is: .tolist())")
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors, numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
