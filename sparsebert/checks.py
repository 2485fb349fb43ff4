"""What the argument checks count as an integer and as a number.

A bool is neither (True is an int to Python, but `batch_size=True` is a mistake); numpy scalars
are both (numbers.Integral / numbers.Real), so a size read from an array is accepted.
Standard library only.
"""

from __future__ import annotations

import math
import numbers


def is_integer(value: object) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int, float or numpy scalar (nan and inf included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """is_number and finite (not nan, not +-inf)."""
    return is_number(value) and math.isfinite(value)
