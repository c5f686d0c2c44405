"""ptx.fields: each need accepts and refuses what its words say, and a section's check names the field."""
import dataclasses
import math

import pytest

from ptx import fields


@pytest.mark.parametrize("need,good,bad", [
    (fields.POSITIVE, [1, 7], [0, -1, 1.0, True, "1"]),
    (fields.COUNT, [0, 3], [-1, 0.0, False]),
    (fields.AXIS, [-1, 1, 4], [0, -2, 2.0]),
    (fields.POSITIVE_NUMBER, [1e-9, 3, 2.5], [0, -1.0, math.inf, math.nan, True]),
    (fields.NON_NEGATIVE, [0, 0.0, 4.5], [-1e-9, math.nan]),
    (fields.PROBABILITY, [0, 0.5, 1], [-0.1, 1.01]),
    (fields.TOP_P, [0.1, 1.0], [0.0, 1.5]),
    (fields.DECAY, [0.0, 0.999], [1.0, -0.5]),
    (fields.BOOL, [True, False], [0, 1, "True"]),
    (fields.STOPS, [(), ("###",), ["a", "b"]], [("",), "###", (1,)]),
    (fields.one_of("a", "b"), ["a", "b"], ["c", None]),
])
def test_each_need_accepts_what_its_words_say_and_refuses_the_rest(need, good, bad):
    assert all(need.test(v) for v in good) and not any(need.test(v) for v in bad)


def test_check_names_the_first_failing_field_with_its_words_and_value():
    @dataclasses.dataclass(frozen=True)
    class Section:
        steps: int = 1
        lr: float = 0.1

        def __post_init__(self):
            fields.check(self, "train", steps=fields.POSITIVE, lr=fields.POSITIVE_NUMBER)

    Section()
    with pytest.raises(ValueError, match=r"^train\.steps: needs a positive integer, got 0$"):
        Section(steps=0, lr=-1.0)
    with pytest.raises(ValueError, match=r"^train\.lr: needs a finite number > 0, got nan$"):
        Section(lr=math.nan)
