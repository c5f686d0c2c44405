"""metrics: the idle guard counts iterations in a row that kept nothing, and stops at its limit."""
import pytest

from ptx import metrics


def test_the_idle_guard_stops_after_limit_empty_iterations_in_a_row_and_says_why():
    guard = metrics.IdleGuard(3, what="pair", fix="raise online.group_size")
    for step, kept in enumerate([0, 0, 4, 0, 0], start=1):  # a kept pair resets the count
        guard.update(kept, step)
    with pytest.raises(metrics.StalledError) as e:
        guard.update(0, 6)
    assert str(e.value) == ("no pair kept for 3 iterations in a row (steps 4-6): every group's rewards tie, "
                            "so nothing trains; raise online.group_size")
    never = metrics.IdleGuard(0, what="pair", fix="")
    for step in range(1, 10):
        never.update(0, step)
