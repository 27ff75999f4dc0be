"""Checks of the ops' non-array arguments, shared by their ``api`` modules: a flag or a size that selects the
computation must be a Python (or NumPy) value, never an array or a tracer, and is refused by name otherwise."""

import math
import operator

import numpy as np


def python_bool(name: str, value) -> bool:
    """``value`` as a bool, or a ValueError naming ``name``: a Python or NumPy bool (a tracer cannot pick code)."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a Python bool (it selects the computation), found {value!r}")
    return bool(value)


def integer(value) -> int | None:
    """``value`` as a Python int when it is a Python or NumPy integer (not a bool), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def python_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a Python or NumPy integer, not a bool), or a ValueError naming ``name``."""
    index = integer(value)
    if index is None:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if index < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {index}")
    return index


def dt_limit_pair(name: str, dt_limit) -> tuple[float, float]:
    """``dt_limit`` as (low, high) floats with low <= high, or a ValueError naming ``name``."""
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of floats (low, high), got {dt_limit!r}") from None
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {dt_limit!r}")
    return low, high
