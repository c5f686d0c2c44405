"""Every experiment script end to end (--tiny) on one shortened quickstart, checked
against properties of what it measures, not only for its files."""
import json
import math
import os

import numpy as np
import pytest

from experiments import (
    best_of_n,
    common,
    dpo_sweep,
    grpo_rewards,
    judge_size,
    online_dpo,
    pass_at_k,
    ppo_kl,
    sampling,
    seeds,
)
from ptx import checkpoint, world
from ptx.oracle import KINDS


def run(module, name, quickstart, tmp_path, *flags):
    """Runs the script; returns (results as written to results.json, runs dir)."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    module.main(["--quickstart", quickstart[0], "--out", str(out), "--runs", str(runs), "--tiny", *flags])
    for f in ("table.md", "results.json", f"{name}.png"):
        assert os.path.getsize(out / f) > 0, f
    with open(out / "results.json") as f:
        return json.load(f), runs


def same_evaluation(ours: dict, quickstart_method: dict):
    """An experiment's evaluation of a quickstart policy reproduces the quickstart's table."""
    for key in ("oracle_reward", "kl_to_sft", "mean_length", "samples"):
        if key in quickstart_method:
            assert ours[key] == quickstart_method[key], key


def stage_config(workdir, stage: str) -> dict:
    with open(os.path.join(workdir, stage, "config.json")) as f:
        return json.load(f)


@pytest.mark.stage
def test_best_of_n_picks_the_rm_argmax_and_reports_the_kl_bound_per_seed(quickstart, tmp_path):
    results, runs = run(best_of_n, "best_of_n", quickstart, tmp_path, "--seeds", "0", "1")
    ns = [int(n) for n in results["best_of"]]
    cands = [json.loads(line) for line in open(runs / "candidates.jsonl")]
    n_max, prompts = results["samples_per_prompt"], results["n_prompts"]
    assert ns == list(best_of_n.TINY_NS) and len(cands) == 2 * prompts * n_max
    assert [c["seed"] for c in cands] == [0] * (prompts * n_max) + [1] * (prompts * n_max)
    rm = np.array([c["rm_score"] for c in cands]).reshape(2, prompts, n_max)
    oracle = np.array([c["oracle_reward"] for c in cands]).reshape(2, prompts, n_max)
    texts = np.array([c["completion"] for c in cands]).reshape(2, prompts, n_max)
    assert (texts[0] != texts[1]).any()  # each seed draws its own samples
    w = world.World(world.WorldConfig(seed=0))
    assert all(c["oracle_reward"] == w.score(c["prompt"], c["completion"]) for c in cands[:50])
    rows = [results["best_of"][str(n)] for n in ns]
    assert rows[0]["rm_score"] == pytest.approx(rm[:, :, 0].mean())  # best-of-1 is one plain sample
    assert results["all_samples"]["rm_score"] == pytest.approx(rm.mean())
    for n, r in zip(ns, rows):
        assert r["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
        for s in range(2):
            pick = rm[s, :, :n].argmax(1)
            assert r["over_seeds"]["rm_score"]["values"][s] == pytest.approx(rm[s, :, :n].max(1).mean())
            assert r["over_seeds"]["oracle_reward"]["values"][s] == pytest.approx(
                oracle[s, np.arange(prompts), pick].mean())
        for key in ("rm_score", "oracle_reward"):
            assert r[key] == pytest.approx(np.mean(r["over_seeds"][key]["values"]))
            assert r["over_seeds"][key]["std"] == pytest.approx(np.std(r["over_seeds"][key]["values"], ddof=1))
        assert r["oracle_ceiling"] == pytest.approx(oracle[:, :, :n].max(2).mean())
        assert r["oracle_ceiling"] >= r["oracle_reward"]
    for a, b in zip(rows, rows[1:]):
        assert a["rm_score"] <= b["rm_score"] and a["oracle_ceiling"] <= b["oracle_ceiling"]


@pytest.mark.stage
def test_pass_at_k_curves_follow_the_closed_form_from_the_sample_counts(quickstart, tmp_path):
    results, runs = run(pass_at_k, "pass_at_k", quickstart, tmp_path, "--n", "4", "--seeds", "0", "1")
    n, kinds = results["n_samples"], results["kinds"]
    assert n == 4 and results["ks"] == [1, 2, 4] and len(kinds) == len(results["counts"]["sft"])
    for name, counts, curve in [("sft", results["counts"]["sft"], lambda kind, k: results["sft"][kind][str(k)])] + [
            (f"grpo{s}", results["counts"]["grpo"][s],
             lambda kind, k, s=s: results["grpo"][kind][str(k)]["values"][s]) for s in range(2)]:
        for kind in set(kinds):
            cs = [c for c, kd in zip(counts, kinds) if kd == kind]
            for k in results["ks"]:
                want = np.mean([1 - math.comb(n - c, k) / math.comb(n, k) for c in cs])
                assert curve(kind, k) == pytest.approx(want), (name, kind, k)
            assert curve(kind, 1) <= curve(kind, 2) <= curve(kind, 4)
    # GRPO trained on the oracle as a verifiable reward, for the quickstart's number of iterations.
    c = stage_config(runs / "grpo_oracle_seed1", "grpo")
    assert (c["reward"]["source"], c["reward"]["function"], c["seed"]) == ("function", "ptx.world:oracle_reward", 1)
    assert checkpoint.resolve(str(runs / "grpo_oracle_seed1" / "grpo"))[1] == results["grpo_steps"]


@pytest.mark.stage
def test_pass_at_k_trains_grpo_on_the_prompts_of_the_chosen_tasks_only(quickstart, tmp_path):
    results, runs = run(pass_at_k, "pass_at_k", quickstart, tmp_path, "--n", "2", "--seeds", "0", "--tasks",
                        "arithmetic")
    assert results["grpo_tasks"] == ["arithmetic"]
    c = stage_config(runs / "grpo_oracle_arithmetic_seed0", "grpo")
    assert c["data"]["train"] == str(runs / "grpo_oracle_arithmetic_prompts.jsonl")
    w = world.World(world.WorldConfig(seed=0))
    sft = [json.loads(line)["prompt"] for line in open(os.path.join(quickstart[0], "world", "sft.jsonl"))]
    rows = [json.loads(line) for line in open(c["data"]["train"])]
    assert [r["prompt"] for r in rows] == [p for p in sft if w.kind_of(p) == "arithmetic"] and rows
    assert checkpoint.resolve(str(runs / "grpo_oracle_arithmetic_seed0" / "grpo"))[1] == results["grpo_steps"]
    # The other stages are the quickstart's own.
    assert os.path.realpath(runs / "grpo_oracle_arithmetic_seed0" / "sft") == os.path.join(quickstart[0], "sft")
    with pytest.raises(ValueError, match="tasks are"):
        pass_at_k.main(["--quickstart", quickstart[0], "--out", str(tmp_path / "o2"), "--runs", str(runs),
                        "--tiny", "--n", "2", "--tasks", "algebra"])


def test_distinct_n_counts_repeated_bigrams_once():
    assert sampling.distinct_n(["a b c", "a b c"], 2) == 0.5
    assert sampling.distinct_n(["a b", "c d"], 2) == 1.0
    assert sampling.distinct_n(["a", ""], 2) == 0.0


@pytest.mark.stage
def test_sampling_greedy_gives_one_answer_per_prompt(quickstart, tmp_path):
    results, _ = run(sampling, "sampling", quickstart, tmp_path)
    s, k = results["settings"], results["samples_per_prompt"]
    assert s["t0_p1"]["unique_answers"] == 1.0
    assert len(s) == 1 + len(sampling.TINY_TEMPERATURES) * len(sampling.TINY_TOP_PS)
    for r in s.values():
        assert 1.0 <= r["unique_answers"] <= k and 0.0 <= r["distinct_2"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0


@pytest.mark.stage
def test_dpo_sweep_reuses_the_quickstart_dpo_and_trains_the_changed_loss(quickstart, tmp_path):
    results, runs = run(dpo_sweep, "dpo_sweep", quickstart, tmp_path)
    beta = results["quickstart_beta"]
    same = results["variants"][f"sigmoid_beta{beta:g}"]
    assert os.path.realpath(runs / f"sigmoid_beta{beta:g}_seed0" / "dpo") == os.path.join(quickstart[0], "dpo")
    same_evaluation(same["runs"][0], quickstart[1]["methods"]["dpo"])
    ipo = runs / f"ipo_beta{beta:g}_seed0"
    assert not os.path.islink(ipo / "dpo") and os.path.realpath(ipo / "sft") == os.path.join(quickstart[0], "sft")
    c = stage_config(ipo, "dpo")
    assert (c["dpo"]["loss_type"], c["dpo"]["beta"]) == ("ipo", beta)
    assert c["init"]["checkpoint"] == str(ipo / "sft")
    assert checkpoint.resolve(str(ipo / "dpo"))[1] == c["train"]["steps"]
    assert results["sft"]["kl_to_sft"] == 0.0


@pytest.mark.stage
def test_ppo_kl_sweep_trains_each_coefficient(quickstart, tmp_path):
    results, runs = run(ppo_kl, "ppo_kl", quickstart, tmp_path)
    c0 = results["quickstart_kl_coef"]
    same_evaluation(results["variants"][f"kl{c0:g}"]["runs"][0], quickstart[1]["methods"]["ppo"])
    assert stage_config(runs / "kl0_seed0", "ppo")["rl"]["kl_coef"] == 0.0
    logged = [json.loads(line) for line in open(runs / "kl0_seed0" / "ppo" / "metrics.jsonl")]
    assert {m["objective/kl_coef"] for m in logged if "objective/kl_coef" in m} == {0.0}


@pytest.mark.stage
def test_grpo_with_the_oracle_reward_trains_on_oracle_scores(quickstart, tmp_path):
    results, runs = run(grpo_rewards, "grpo_rewards", quickstart, tmp_path, "--seeds", "0")
    same_evaluation(results["variants"]["grpo_rm"]["runs"][0], quickstart[1]["methods"]["grpo"])
    # Per task, beside the reward model's score: the same evaluation as the quickstart's table.
    for kind in KINDS:
        assert (results["variants"]["grpo_rm"][f"accuracy/{kind}"]["values"]
                == [quickstart[1]["methods"]["grpo"][f"accuracy/{kind}"]])
    assert "Per task, the reward model's score / the oracle's accuracy" in (tmp_path / "out" / "table.md").read_text()
    # The held-out prompts split evenly over the tasks: the per-task scores average to the whole.
    for arm in ("sft", "grpo_rm"):
        r = results[arm] if arm == "sft" else {k: v["values"][0] for k, v in results["variants"][arm].items()
                                                if isinstance(v, dict) and "values" in v}
        assert np.mean([r[f"rm_score/{kind}"] for kind in KINDS]) == pytest.approx(r["rm_score"], rel=1e-5)
    c = stage_config(runs / "rloo_oracle_seed0", "grpo")
    assert (c["rl"]["advantage"], c["reward"]["source"]) == ("rloo", "function")
    logged = [json.loads(line) for line in open(runs / "rloo_oracle_seed0" / "grpo" / "metrics.jsonl")]
    scores = [m["objective/scores"] for m in logged if "objective/scores" in m]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)  # the oracle's range; a reward model's is not


@pytest.mark.stage
def test_grpo_rewards_trains_the_chosen_arms_for_the_given_iterations(quickstart, tmp_path):
    results, runs = run(grpo_rewards, "grpo_rewards", quickstart, tmp_path, "--seeds", "0", "--arms", "grpo_oracle",
                        "--steps", "3")
    assert list(results["variants"]) == ["grpo_oracle_3"] and results["steps"] == 3
    assert checkpoint.resolve(str(runs / "grpo_oracle_3_seed0" / "grpo"))[1] == 3
    assert stage_config(runs / "grpo_oracle_3_seed0", "grpo")["reward"]["source"] == "function"


@pytest.mark.stage
def test_judge_size_retrains_the_judge_chain_from_the_quickstart_pretraining(quickstart, tmp_path):
    results, runs = run(judge_size, "judge_size", quickstart, tmp_path, "--seeds", "0")
    steps = results["quickstart_judge_steps"]
    qs_aif = quickstart[1]["ai_feedback"]
    assert results["judges"][str(steps)]["position_flip_rate"]["mean"] == qs_aif["position_flip_rate"]
    same_evaluation(results["rlhf"]["runs"][0], quickstart[1]["methods"]["dpo"])
    new = runs / "steps1_seed0"
    assert checkpoint.resolve(str(new / "judge"))[1] == 1
    for stage in ("judge", "ai_feedback", "rlaif"):
        assert not os.path.islink(new / stage), stage
    assert os.path.islink(new / "sft") and os.path.islink(new / "pretrain")
    assert stage_config(new, "ai_feedback")["judge_checkpoint"] == str(new / "judge")
    assert stage_config(new, "judge")["init"]["checkpoint"] == str(new / "pretrain")
    assert results["human_label_agreement_with_oracle"] == qs_aif["human_label_agreement_with_oracle"]
    assert 0.0 <= results["judges"]["1"]["position_flip_rate"]["mean"] <= 1.0


@pytest.mark.stage
def test_seeds_summary_is_the_mean_and_spread_over_seeds(quickstart, tmp_path):
    # Seed 1 as if it had run: the quickstart's results with every oracle reward shifted.
    fake = json.loads(json.dumps(quickstart[1]))
    for i, m in enumerate(fake["methods"].values()):
        m["oracle_reward"] += 0.05 * i
    os.makedirs(tmp_path / "runs" / "seed_1")
    with open(tmp_path / "runs" / "seed_1" / "results.json", "w") as f:
        json.dump(fake, f)
    results, runs = run(seeds, "seeds", quickstart, tmp_path, "--seeds", "0", "1")
    assert os.path.islink(runs / "seed_0" / "sft")
    with open(runs / "seed_0" / "results.json") as f:
        seed0 = json.load(f)
    for name, m in quickstart[1]["methods"].items():
        same_evaluation(seed0["methods"][name], m)
        a, b = m["oracle_reward"], fake["methods"][name]["oracle_reward"]
        r = results["methods"][name]
        assert r["mean"] == pytest.approx((a + b) / 2) and r["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    spread = max(r["std"] for r in results["methods"].values())
    assert results["spread"] == pytest.approx(spread)
    sft = results["methods"]["sft"]["mean"]
    for r in results["methods"].values():
        assert r["beats_sft"] == (r["mean"] - sft > spread)
    # Per task: each kind's accuracy and reward over the seeds (seed 1's equal seed 0's here).
    for name, m in quickstart[1]["methods"].items():
        tasks = results["per_task"][name]
        assert {k for k in m if k.startswith(("accuracy/", "reward/"))} == set(tasks) and tasks
        for key, stat in tasks.items():
            assert stat["values"] == [m[key], m[key]] and stat["std"] == 0.0
    assert "Accuracy per task" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.stage
def test_a_variant_names_only_quickstart_stages(quickstart, tmp_path):
    qs = common.load_quickstart(quickstart[0], tiny=True)
    with pytest.raises(ValueError, match="no quickstart stage"):
        common.train_variant(qs, str(tmp_path), {"dpo2": {}})


@pytest.mark.stage
def test_online_dpo_reuses_the_quickstart_row_for_seed_0_and_retrains_other_seeds(quickstart, tmp_path):
    results, runs = run(online_dpo, "online_dpo", quickstart, tmp_path, "--seeds", "0", "1")
    row = results["variants"]["quickstart"]
    assert os.path.realpath(runs / "quickstart_seed0" / "online_dpo") == os.path.join(quickstart[0], "online_dpo")
    same_evaluation(row["runs"][0], quickstart[1]["methods"]["online_dpo"])
    again = runs / "quickstart_seed1"
    assert not os.path.islink(again / "online_dpo") and stage_config(again, "online_dpo")["seed"] == 1
    assert row["oracle_reward"]["values"] == [r["oracle_reward"] for r in row["runs"]]
    assert row["oracle_reward"]["mean"] == np.mean(row["oracle_reward"]["values"])
