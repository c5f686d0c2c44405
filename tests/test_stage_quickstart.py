"""The quickstart shortened to a few steps per stage, its seed and extra-method switches, and the sample
and best-of-N commands on its checkpoints."""
import json
import os

import pytest

from configs import best_of_n as bon_config
from configs import quickstart as quickstart_config
from configs import sample as sample_config
from ptx import rewards
from ptx.stages import best_of_n as best_of_n_stage
from ptx.stages import quickstart as quickstart_stage
from ptx.stages import sample as sample_stage


@pytest.mark.stage
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


@pytest.mark.stage
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
    extra = quickstart_stage.EXTRA_METHODS
    assert quickstart_stage.STAGES[-len(extra):] == extra  # after the whole recipe
    assert set(extra) == {"kto", "orpo", "cpo", "bco", "gspo", "online_dpo"}  # every row with a quickstart kind
    c.methods.kto = c.methods.gspo = False
    assert quickstart_stage.stages_of(c) == tuple(s for s in quickstart_stage.STAGES if s not in ("kto", "gspo"))
