"""What a config field's value must be, said once for every section's frozen dataclass.

A section's `__post_init__` calls `check(self, "section", field=NEED, ...)`; a value that
fails raises ValueError("section.field: needs <words>, got <value>"), which `validate`
turns into its one-line error naming the field.
"""
import dataclasses
import math
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Need:
    """What one field's value must be: a test and its words ("a positive integer")."""

    test: Callable
    words: str


def is_int(v) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def one_of(*choices) -> Need:
    return Need(lambda v: v in choices, f"one of {choices}")


INT = Need(is_int, "an integer")
POSITIVE = Need(lambda v: is_int(v) and v > 0, "a positive integer")
COUNT = Need(lambda v: is_int(v) and v >= 0, "an integer >= 0")
AXIS = Need(lambda v: is_int(v) and (v > 0 or v == -1), "a positive integer, or -1 for the rest of the devices")
POSITIVE_NUMBER = Need(lambda v: is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Need(lambda v: is_number(v) and v >= 0, "a finite number >= 0")
PROBABILITY = Need(lambda v: is_number(v) and 0 <= v <= 1, "a probability in [0, 1]")
TOP_P = Need(lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]")
DECAY = Need(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL = Need(lambda v: isinstance(v, bool), "True or False")
TEXT = Need(lambda v: isinstance(v, str), "a string")
STOPS = Need(lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str) and s for s in v),
             "a tuple of non-empty strings, e.g. \"('\\n\\nHuman:', '###')\" or () for none")


def check(obj, section: str, **needs: Need):
    """ValueError naming the first field of `obj` (a section's dataclass) whose value fails its need."""
    for name, need in needs.items():
        value = getattr(obj, name)
        if not need.test(value):
            raise ValueError(f"{section}.{name}: needs {need.words}, got {value!r}")
