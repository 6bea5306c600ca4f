"""Checks of plain Python arguments shared across the package (tensors' are `ops.dispatch.require_integers`
and its neighbours)."""
from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    """Whether `value` is a Python or NumPy integer: not a bool (True would count as 1) nor a float (2.5 would be
    cut to 2 by an int() after the check)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_count(value, least: int = 0) -> bool:
    """Whether `value` is an integer (`is_integer`) of at least `least`."""
    return is_integer(value) and value >= least
