"""NumPy scalars in configurations: values from a sweep (``np.linspace``, ``np.arange``, an array's
element) are ``np.float32(99.9)``, ``np.int64(32)`` or ``np.True_``, which are no ``float``, ``int`` or
``bool`` (only ``np.float64`` subclasses ``float``). A configuration holds the Python number instead,
so its checks, its reports and its JSON see the value the user meant.
"""

from __future__ import annotations

import dataclasses
import operator

__all__ = ["is_integer", "is_number", "plain_fields", "plain_scalar"]


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def plain_scalar(value: object) -> object:
    """``value`` as a Python number when it is a NumPy scalar or a 0-d array; anything else as it is."""
    if type(value).__module__ != "numpy" or getattr(value, "ndim", None) != 0 or not hasattr(value, "item"):
        return value
    plain = value.item()
    if isinstance(plain, float) and value.dtype.itemsize < 8:  # np.float32(99.9) meant 99.9, not 99.9000015...
        return float(str(value))
    return plain


def plain_fields(config: object) -> None:
    """Each field of the frozen dataclass ``config`` holding a NumPy scalar, or a tuple holding some,
    holds Python numbers instead (set in place, as ``__post_init__`` may)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        plain = tuple(map(plain_scalar, value)) if isinstance(value, tuple) else plain_scalar(value)
        if plain is not value and (not isinstance(value, tuple) or any(map(operator.is_not, plain, value))):
            object.__setattr__(config, field.name, plain)
