"""Online DPO: pairs are the best and worst sampled completions, built from the sampled ids;
every iteration samples from the current policy, so its completions change as it learns."""
import json
import os

import jax
import numpy as np
import pytest

from configs import online_dpo as online_dpo_config
from ptx import checkpoint, inference, metrics, online, stages
from ptx.stages import online_dpo


def letter_share(prompt: str, completion: str) -> float:
    """A dense, known reward: the share of letters among the completion's characters."""
    return sum(ch.isalpha() for ch in completion) / max(len(completion), 1)


def test_preference_batch_pairs_the_best_and_worst_sample_of_each_group_from_their_token_ids():
    # Two groups of three rows in the rollout layout: prompt width 3 (left-aligned), 2 completion tokens.
    tokens = np.array([[0, 1, 5, 10, 11], [0, 1, 5, 12, 0], [0, 1, 5, 13, 14],
                       [1, 6, 7, 20, 21], [1, 6, 7, 22, 23], [1, 6, 7, 24, 0]], np.int32)
    segment = (tokens > 0).astype(np.int32)
    segment[[0, 1, 2], 0] = 0
    seq = {"tokens": tokens, "positions": np.cumsum(segment, 1) - 1, "segment_ids": segment,
           "completion": tokens[:, 3:], "mask": (tokens[:, 3:] > 0).astype(np.float32)}
    batch, tied = online.preference_batch(seq, np.array([0.2, 0.9, 0.1, 0.5, 0.5, 0.5]), 3)
    np.testing.assert_array_equal(tied, [False, True])
    np.testing.assert_array_equal(batch["chosen_inputs"][0], [0, 1, 5, 12])
    # Targets and loss masks of the completion's columns (inputs 2 and 3) alone.
    np.testing.assert_array_equal(batch["chosen_targets"][0], [12, 0])
    np.testing.assert_array_equal(batch["chosen_loss_mask"][0], [1, 0])
    np.testing.assert_array_equal(batch["rejected_targets"][0], [13, 14])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][0], [1, 1])
    np.testing.assert_array_equal(batch["rejected_segment_ids"][0], [0, 1, 1, 1])
    assert batch["prob_chosen"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("overrides,match", [
    ({"online.group_size": 1}, "at least 2 completions"),
    ({"dpo.precompute_ref": True}, "no data set"),
    ({"dpo.soft_labels": True}, "no data set"),
    ({"dpo.shared_prefix": True}, "shared-prefix rows"),
    ({"lora.rank": 4}, "lora.rank must be 0"),
    ({"online.minibatch_size": 16}, "exceed"),
])
def test_bad_online_dpo_configs_are_errors_before_the_workdir_is_written(tmp_path, overrides, match):
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = str(tmp_path / "sft")
    c.reward.source = "function"
    c.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=match):
        stages.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_online_dpo_samples_each_iteration_from_the_current_policy(sft_dir, tmp_path, monkeypatch):
    calls = []
    original = inference.Sampler.__call__

    def record(self, prompt_tokens, prompt_lens, seed, *, params=None, **settings):
        chunks = original(self, prompt_tokens, prompt_lens, seed, params=params, **settings)
        calls.append(dict(params=jax.device_get(params), tokens=prompt_tokens, lens=prompt_lens, seed=seed,
                          settings=settings, out=chunks[0]["tokens"], sampler=self))
        return chunks

    monkeypatch.setattr(inference.Sampler, "__call__", record)
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = sft_dir
    c.reward.source, c.reward.function = "function", "test_online_dpo:letter_share"
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
    mesh = calls[1]["sampler"].policy.mesh
    sft_params, _ = checkpoint.load_params(sft_dir, mesh)
    after_one, _ = checkpoint.load_params(os.path.join(workdir, "checkpoints", "1"), mesh)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                  jax.tree_util.tree_leaves(b)))
    assert same(calls[0]["params"], jax.device_get(sft_params))
    assert same(calls[1]["params"], jax.device_get(after_one)) and not same(calls[1]["params"], calls[0]["params"])
    # Iteration 2's completions are the updated policy's: the same prompts and keys under the SFT
    # weights sample other completions, under the weights after iteration 1 the very same ones.
    second = calls[1]
    resample = lambda p: original(second["sampler"], second["tokens"], second["lens"], second["seed"], params=p,
                                  **second["settings"])[0]["tokens"]
    np.testing.assert_array_equal(resample(after_one), second["out"])
    assert not np.array_equal(resample(sft_params), second["out"])


def constant(prompt: str, completion: str) -> float:
    return 1.0


def test_online_dpo_that_keeps_no_pair_for_max_idle_iterations_stops_saying_why(sft_dir, tmp_path):
    c = online_dpo_config.get_config("tiny")
    c.init.checkpoint = sft_dir
    c.reward.source, c.reward.function = "function", "test_online_dpo:constant"
    c.online.max_retries, c.online.max_idle_iterations = 0, 2
    c.train.steps, c.train.ckpt_every = 4, 0
    with pytest.raises(metrics.StalledError, match=r"^no pair kept for 2 iterations in a row \(steps 1-2\): every "
                                                   r"group's rewards tie, so nothing trains; check reward.function"):
        online_dpo.run(c, str(tmp_path / "odpo"))
