"""ptx.evaluate: the oracle summary of a policy's samples and the pass@k estimator."""
import math

import numpy as np
import pytest

from ptx import evaluate


def test_summary_counts_refusals_and_accuracy_by_kind():
    grades = [{"reward": 1.0, "correct": True, "refused": False, "kind": "arithmetic"},
              {"reward": 0.0, "correct": False, "refused": True, "kind": "arithmetic"},
              {"reward": 1.0, "correct": True, "refused": True, "kind": "harmful"},
              {"reward": 0.0, "correct": False, "refused": False, "kind": "harmful"},
              {"reward": 0.5, "correct": True, "refused": False, "kind": "harmful"}]
    s = evaluate.summarize(grades, [3, 5, 7, 9, 6])
    assert s["oracle_reward"] == 0.5 and s["accuracy/arithmetic"] == 0.5 and s["reward/arithmetic"] == 0.5
    assert s["accuracy/harmful"] == 2 / 3 and s["reward/harmful"] == 0.5
    assert s["correct_refusal_rate"] == 1 / 3 and s["over_refusal_rate"] == 0.5 and s["mean_length"] == 6


def test_pass_at_k_equals_the_combinatorial_formula_and_a_simulation():
    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 4), (10, 8, 5), (256, 1, 16), (256, 40, 100), (5, 5, 5)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        np.testing.assert_allclose(evaluate.pass_at_k(n, c, k), exact, rtol=1e-12, atol=1e-15)
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # The chance that k draws without replacement from n samples (c correct) hit a correct one.
    rng = np.random.default_rng(0)
    hits = np.mean([rng.permutation(12)[:5].min() < 4 for _ in range(20000)])
    assert abs(hits - evaluate.pass_at_k(12, 4, 5)) < 0.01
    with pytest.raises(ValueError, match="pass@k"):
        evaluate.pass_at_k(4, 5, 1)
