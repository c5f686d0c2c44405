"""The online DPO stage: config errors before the workdir is written; every iteration samples from the
current policy, so its completions change as it learns."""
import json
import os

import jax
import numpy as np
import pytest

from configs import online_dpo as online_dpo_config
from ptx import checkpoint, metrics, rollout, stages
from ptx.stages import online_dpo


@pytest.mark.parametrize("overrides,match", [
    ({"online.group_size": 1}, "at least 2 completions"),
    ({"dpo.precompute_ref": True}, "no data set"),
    ({"dpo.soft_labels": True}, "no data set"),
    ({"dpo.shared_prefix": True}, "shared-prefix rows"),
    ({"lora.rank": 4}, "lora.rank must be 0"),
    ({"online.minibatch_size": 16}, "exceed"),
    ({"online.engine": "paged"}, r"online\.engine: 'paged' runs on one device .* 8 devices"),
])
def test_bad_online_dpo_configs_are_errors_before_the_workdir_is_written(tmp_path, overrides, match):
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = str(tmp_path / "sft")
    c.reward.source = "function"
    c.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=match):
        stages.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.stage
def test_online_dpo_samples_each_iteration_from_the_current_policy(sft_dir, tmp_path, monkeypatch):
    calls = []
    original = rollout.Collector.__call__

    def record(self, params, it, attempt=0):
        seq, host = original(self, params, it, attempt)
        calls.append(dict(params=jax.device_get(params), it=it, attempt=attempt, out=host["completion"],
                          collector=self))
        return seq, host

    monkeypatch.setattr(rollout.Collector, "__call__", record)
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = sft_dir
    c.reward.source, c.reward.function = "function", "reward_fns:letter_share"
    c.optim.lr = 5e-3
    c.train.steps, c.train.ckpt_every = 2, 1
    workdir = str(tmp_path / "odpo")
    online_dpo.run(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["pairs/kept"] == c.online.rollout_batch for r in rows)
    # The first pairs come from the reference itself: DPO's first loss is log 2 and the KL 0.
    np.testing.assert_allclose(rows[0]["loss"], np.log(2), rtol=1e-5)
    assert abs(rows[0]["objective/kl"]) < 1e-3 and rows[1]["rewards/margins"] != 0
    assert len(calls) == 2  # a continuous reward never ties a group: one draw per iteration
    mesh = calls[1]["collector"].mesh
    sft_params, _ = checkpoint.load_params(sft_dir, mesh)
    after_one, _ = checkpoint.load_params(os.path.join(workdir, "checkpoints", "1"), mesh)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                  jax.tree_util.tree_leaves(b)))
    assert same(calls[0]["params"], jax.device_get(sft_params))
    assert same(calls[1]["params"], jax.device_get(after_one)) and not same(calls[1]["params"], calls[0]["params"])
    # Iteration 2's completions are the updated policy's: the same prompts and keys under the SFT
    # weights sample other completions, under the weights after iteration 1 the very same ones.
    second = calls[1]
    resample = lambda p: original(second["collector"], p, second["it"], second["attempt"])[1]["completion"]
    np.testing.assert_array_equal(resample(after_one), second["out"])
    assert not np.array_equal(resample(sft_params), second["out"])


@pytest.mark.stage
def test_online_dpo_that_keeps_no_pair_for_max_idle_iterations_stops_saying_why(sft_dir, tmp_path):
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = sft_dir
    c.reward.source, c.reward.function = "function", "test_stage_rl:constant_reward"
    c.online.max_retries, c.online.max_idle_iterations = 0, 2
    c.train.steps, c.train.ckpt_every = 4, 0
    with pytest.raises(metrics.StalledError, match=r"^no pair kept for 2 iterations in a row \(steps 1-2\): every "
                                                   r"group's rewards tie, so nothing trains; check reward.function"):
        online_dpo.run(c, str(tmp_path / "odpo"))
