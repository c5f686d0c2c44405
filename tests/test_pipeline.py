"""Best-of-N selection, the sample command, and the quickstart shortened to a few steps per stage."""
import json
import math
import os

import numpy as np
import pytest

from configs import best_of_n as bon_config
from configs import quickstart as quickstart_config
from configs import sample as sample_config
from ptx import best_of_n, evaluate, rewards
from ptx.stages import best_of_n as best_of_n_stage
from ptx.stages import quickstart as quickstart_stage
from ptx.stages import sample as sample_stage


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


def test_shortened_quickstart_runs_end_to_end_and_writes_its_report(quickstart):
    workdir, on_disk = quickstart
    for method in ("base", "sft", "dpo", "ppo", "grpo", "rlaif", "best_of_2", "best_of_4", "online_dpo", "kto",
                   "orpo", "gspo"):
        assert 0.0 <= on_disk["methods"][method]["oracle_reward"] <= 1.0
    assert 0.0 <= on_disk["reward_model"]["heldout_accuracy"] <= 1.0
    aif = on_disk["ai_feedback"]
    assert aif["n_pairs"] > 0 and 0.0 <= aif["position_flip_rate"] <= 1.0
    with open(os.path.join(workdir, "human_feedback", "preferences.jsonl")) as f:
        human = [json.loads(line) for line in f]
    assert aif["human_label_pairs"] == len(human)
    assert aif["human_label_agreement_with_oracle"] is None if not human else (
        0.5 < aif["human_label_agreement_with_oracle"] <= 1.0)
    with open(os.path.join(workdir, "human_feedback", "train.jsonl")) as f:
        train_rows = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "world", "preference.jsonl")) as f:
        assert train_rows == [json.loads(line) for line in f] + human
    assert on_disk["methods"]["sft"]["kl_to_sft"] == 0.0
    assert os.path.exists(os.path.join(workdir, "report.md"))
    assert os.path.exists(os.path.join(workdir, "oracle_reward.png"))


def test_sample_and_best_of_n_commands_write_their_files(quickstart, tmp_path):
    workdir, _ = quickstart
    c = sample_config.get_config("tiny")
    c.checkpoint = os.path.join(workdir, "sft")
    c.prompt = "What is 2 + 3?"
    c.sampling.num_samples, c.sampling.temperature = 2, 0.0

    path = sample_stage.run(c, str(tmp_path / "sample"))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 2 and rows[0]["completion"] == rows[1]["completion"]  # greedy
    assert rows[0]["finish_reason"] in ("eos", "stop", "length")

    b = bon_config.get_config("tiny")
    b.checkpoint = os.path.join(workdir, "sft")
    b.reward.source = "function"
    b.reward.function = "ptx.world:oracle_reward"
    b.prompts = os.path.join(workdir, "world", "heldout.jsonl")
    b.batch_size = 8
    results = best_of_n_stage.run(b, str(tmp_path / "bon"))
    best = [results[f"best_of_{n}"]["best"] for n in b.ns]
    assert all(x <= y for x, y in zip(best, best[1:]))
    cands = [json.loads(line) for line in open(tmp_path / "bon" / "candidates.jsonl")]
    assert len(cands) == 40 * max(b.ns)
    # Scores on disk are the oracle's own.
    fn = rewards.import_function("ptx.world:oracle_reward")
    for cand in cands[:10]:
        assert cand["score"] == pytest.approx(fn(cand["prompt"], cand["completion"]))


def test_quickstart_seed_arg_reseeds_every_stage_and_the_evaluation_but_not_the_world():
    c = quickstart_config.get_config("tiny,seed=7")
    stages = [k for k, v in c.items() if hasattr(v, "get") and "seed" in v and k not in ("world", "eval")]
    assert set(stages) >= set(quickstart_stage.STAGES)
    assert all(c[k].seed == 7 for k in stages) and c.eval.seed == 7 + 1234 and c.world.seed == 0
    assert quickstart_config.get_config("tiny").sft.seed == 0


def test_each_extra_method_runs_after_the_recipe_behind_its_flag():
    c = quickstart_config.get_config("tiny")
    assert quickstart_stage.stages_of(c) == quickstart_stage.STAGES
    assert quickstart_stage.STAGES[-4:] == quickstart_stage.EXTRA_METHODS
    c.methods.kto = c.methods.gspo = False
    assert quickstart_stage.stages_of(c) == tuple(s for s in quickstart_stage.STAGES if s not in ("kto", "gspo"))
