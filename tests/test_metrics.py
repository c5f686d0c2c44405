"""ptx.metrics: a resumed run's log keeps the lines up to its step, the window of a checkpoint reads back
in its dtypes, and the NaN guard says which checkpoint holds the last good state.

(New with the one-file-per-module layout: before, metrics.py was tested only through whole-stage runs.)"""
import json

import numpy as np
import pytest

from ptx import metrics


def test_truncate_keeps_the_lines_up_to_the_step_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    metrics.truncate(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    metrics.truncate(str(path), 0)
    assert path.read_text() == ""
    metrics.truncate(str(tmp_path / "missing.jsonl"), 3)
    assert not (tmp_path / "missing.jsonl").exists()


def test_a_fresh_writer_replaces_the_log_of_a_killed_attempt_and_a_resumed_one_continues_it(tmp_path):
    w = metrics.MetricWriter(str(tmp_path), total_steps=4)
    for step in (1, 2, 3):
        w.write(step, {"loss": np.float32(0.5)})
    w.close()
    w = metrics.MetricWriter(str(tmp_path), total_steps=4, start_step=2)
    w.write(3, {"loss": 0.25, "lr": np.array([1e-3])})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25, "lr": 1e-3}]
    metrics.MetricWriter(str(tmp_path), total_steps=4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_window_state_reads_back_the_same_values_in_their_dtypes():
    history = [{"loss": np.float32(0.5), "tokens": np.int32(7)}, {"loss": np.float32(0.25), "tokens": np.int32(9)}]
    back = metrics.window_from_state(json.loads(json.dumps(metrics.window_state(history))))
    assert [{k: (v.item(), v.dtype) for k, v in h.items()} for h in back] == [
        {k: (v.item(), v.dtype) for k, v in h.items()} for h in history]
    assert metrics.window_from_state(None) == []
    assert metrics.mean_metrics(history) == {"loss": 0.375, "tokens": 8.0}


def test_the_nan_guard_names_the_last_good_checkpoint_or_none():
    metrics.check_finite({"loss": 1.0, "nonfinite": 0.0}, 3)
    with pytest.raises(metrics.NonFiniteError, match=r"before step 7.*checkpoint \(step 6\) is intact"):
        metrics.check_finite({"loss": float("nan")}, 7, last_checkpoint=6)
    with pytest.raises(metrics.NonFiniteError, match="no checkpoint of this run was written yet"):
        metrics.check_finite({"loss": 1.0, "nonfinite": 1.0}, 2)


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
