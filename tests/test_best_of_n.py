"""ptx.best_of_n: picking the best of N scored samples, and the analytic KL bound."""
import numpy as np
import pytest

from ptx import best_of_n


def test_best_of_n_picks_the_argmax_and_its_mean_is_monotone_in_n():
    scores = np.random.default_rng(0).normal(size=(50, 16))
    picked = best_of_n.select(scores, [1, 2, 4, 8, 16])
    for n, r in picked.items():
        np.testing.assert_array_equal(r["best_index"], scores[:, :n].argmax(1))
        assert r["worst"] <= r["random"] <= r["best"] or n == 1
    best = [picked[n]["best"] for n in (1, 2, 4, 8, 16)]
    assert all(a <= b for a, b in zip(best, best[1:]))
    assert picked[1]["best"] == picked[1]["random"] == picked[1]["worst"]
    with pytest.raises(ValueError, match="best-of-32"):
        best_of_n.select(scores, [32])


def test_kl_bound_is_the_analytic_formula():
    assert best_of_n.kl_bound(1) == 0.0
    np.testing.assert_allclose(best_of_n.kl_bound(16), np.log(16) - 15 / 16)
