"""PPO / GRPO / RLOO: first-minibatch ratio, zero KL at the reference, learning a known reward."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import dapo as dapo_config
from configs import grpo as grpo_config
from configs import gspo as gspo_config
from configs import ppo as ppo_config
from ptx import losses, metrics, rollout, sampler, sharding, steps
from ptx.model import ModelConfig, Transformer, init_params
from ptx.stages import common, rl


def letter_share(prompt: str, completion: str) -> float:
    """A dense, known reward: the share of letters among the completion's characters."""
    return sum(ch.isalpha() for ch in completion) / max(len(completion), 1)


def rl_cfg(kind, sft_dir, seed=0, steps=1):
    c = {"ppo": ppo_config, "gspo": gspo_config, "dapo": dapo_config}.get(kind, grpo_config).get_config("tiny")
    c.seed = seed
    c.init.checkpoint = sft_dir
    c.reward.source = "function"
    c.reward.function = "test_rl:letter_share"
    c.rl.critic = "policy"
    c.train.steps = steps
    c.train.ckpt_every = 0
    if kind == "rloo":
        c.rl.advantage, c.rl.kl_in_loss, c.rl.kl_estimator = "rloo", False, "k1"
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def rollout_at_the_reference(kind, sft_dir, old_logprobs, kl_coef=0.1, no_reference=False):
    """One prepared rollout of 2 prompts x 4 completions from the SFT policy: (config, params,
    policy model, sampler output, prepared batch, metrics). no_reference: rl.kl_coef = 0 in the
    config and no reference parameters passed at all."""
    c = rl_cfg(kind, sft_dir)
    c.rl.old_logprobs = old_logprobs
    if no_reference:
        c.rl.kl_coef = 0.0
    mesh = sharding.make_mesh(c.mesh)
    policy_cfg, critic_cfg, params, ref = rl.build_models(c, mesh)
    policy_model = Transformer(policy_cfg)
    prompts = np.array([[2, 40, 41, 42], [2, 43, 44, 0]], np.int32).repeat(4, axis=0)
    lens = np.array([4, 3], np.int32).repeat(4)
    gen = sampler.make_generate_fn(policy_cfg, max_new_tokens=8, eos_id=3, group_size=4)
    out = gen(params["policy"], prompts, lens, jax.random.split(jax.random.PRNGKey(0), 8))
    seq = rollout.build_sequences(prompts, lens, out, pad_id=0)
    scores = np.linspace(0, 1, 8).astype(np.float32)
    batch, m = rollout.prepare(params, None if no_reference else ref, seq, scores, kl_coef, policy_model=policy_model,
                               critic_model=None, width=4, rl_cfg=common.rl_config(c))
    return c, params, policy_model, out, batch, m


def first_minibatch_metrics(c, params, policy_model, batch):
    first = jax.tree_util.tree_map(lambda x: x[:4], batch)
    return rollout.rl_loss_fn(params, first, policy_model=policy_model, critic_model=None, width=4,
                              rl_cfg=common.rl_config(c))[1]


@pytest.mark.parametrize("kind", ["ppo", "grpo", "gspo"])
def test_first_minibatch_ratio_is_one_and_kl_is_zero_at_the_reference(sft_dir, kind):
    # Old log-probs from a teacher-forced forward: the same program as the update's, so exact.
    c, params, policy_model, out, batch, m = rollout_at_the_reference(kind, sft_dir, "forward")
    assert float(m["objective/kl"]) == 0.0
    np.testing.assert_allclose(batch["ref_logps"], batch["old_logps"], atol=0)
    metrics = first_minibatch_metrics(c, params, policy_model, batch)
    np.testing.assert_allclose(metrics["val/ratio"], 1.0, atol=1e-6)
    assert float(metrics["policy/clipfrac"]) == 0.0
    if kind != "ppo":
        np.testing.assert_allclose(metrics["loss/kl"], 0.0, atol=1e-7)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_sampler_old_logprobs_are_the_sampler_s_and_agree_with_the_forward_within_1e4(sft_dir, kind):
    c, params, policy_model, out, batch, m = rollout_at_the_reference(kind, sft_dir, "sampler")
    _, _, _, _, forward, m_forward = rollout_at_the_reference(kind, sft_dir, "forward")
    mask = np.asarray(batch["mask"])
    np.testing.assert_array_equal(batch["old_logps"], out.logprobs)
    # float32, tiny model: the cached decode and the full forward differ only in rounding.
    np.testing.assert_allclose(batch["old_logps"], forward["old_logps"] * mask, atol=1e-4)
    for k in ("advantages", "returns", "old_values", "ref_logps"):
        np.testing.assert_allclose(batch[k] * mask, forward[k] * mask, atol=1e-4, err_msg=k)
    for k in m_forward:
        np.testing.assert_allclose(m[k], m_forward[k], atol=1e-4, err_msg=k)
    metrics = first_minibatch_metrics(c, params, policy_model, batch)
    np.testing.assert_allclose(metrics["val/ratio"], 1.0, atol=1e-4)
    assert float(metrics["policy/clipfrac"]) == 0.0


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_without_a_kl_term_the_reference_is_not_read_and_the_update_is_unchanged(sft_dir, kind):
    # rl.kl_coef = 0 and no reference parameters at all, against a run with a KL term at coefficient 0.
    c, params, policy_model, _, batch, m = rollout_at_the_reference(kind, sft_dir, "sampler", 0.0, no_reference=True)
    c_ref, _, _, _, with_ref, m_ref = rollout_at_the_reference(kind, sft_dir, "sampler", 0.0)
    assert set(with_ref) - set(batch) == {"ref_logps"} and set(m_ref) - set(m) == {"objective/kl"}
    for k in batch:
        np.testing.assert_array_equal(batch[k], with_ref[k], err_msg=k)
    loss = lambda cfg, b: rollout.rl_loss_fn(params, jax.tree_util.tree_map(lambda x: x[:4], b),
                                             policy_model=policy_model, critic_model=None, width=4,
                                             rl_cfg=common.rl_config(cfg))[0]
    np.testing.assert_allclose(loss(c, batch), loss(c_ref, with_ref), rtol=1e-6)


@pytest.mark.parametrize("kind", ["ppo", "grpo", "rloo"])
def test_rl_raises_a_known_reward_across_three_seeds(sft_dir, tmp_path, kind):
    gains = []
    for seed in range(3):
        c = rl_cfg(kind, sft_dir, seed=seed, steps=10)
        c.optim.lr = 3e-3
        c.rl.kl_coef, c.rl.vf_coef, c.rl.num_epochs = 0.01, 0.5, 4
        c.rl.rollout_batch, c.rl.minibatch_size = (32, 16) if kind == "ppo" else (8, 16)
        rows = read_metrics_after(c, tmp_path / f"{kind}{seed}")
        scores = [r["objective/scores"] for r in rows]
        gains.append(np.mean(scores[-3:]) - np.mean(scores[:3]))
        assert all(r["objective/kl"] < 20 for r in rows)
    assert min(gains) > 0.0 and np.mean(gains) > 0.02, gains


def read_metrics_after(c, workdir):
    rl.run(c, str(workdir))
    return read_metrics(workdir)


def test_ppo_resume_restores_the_kl_controller_and_continues(sft_dir, tmp_path):
    c = rl_cfg("ppo", sft_dir, steps=2)
    c.rl.adaptive_kl, c.rl.kl_target, c.rl.kl_horizon = True, 0.001, 10
    c.train.ckpt_every = 1
    rl.run(c, str(tmp_path))
    first = read_metrics(tmp_path)
    c.train.steps = 3
    rl.run(c, str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first
    # Each coefficient is the controller's update of the previous one, across the resume too.
    for prev, cur in zip(rows, rows[1:]):
        expected = losses.adaptive_kl_update(prev["objective/kl_coef"], prev["objective/kl"], target=0.001,
                                             horizon=10, n_steps=c.rl.rollout_batch)
        np.testing.assert_allclose(cur["objective/kl_coef"], float(expected), rtol=1e-6)
    assert rows[2]["objective/kl_coef"] != rows[0]["objective/kl_coef"]


def test_grpo_killed_resumes_to_the_same_parameters_and_logs(sft_dir, resumes_like_straight):
    c = rl_cfg("grpo", sft_dir, steps=4)
    c.train.ckpt_every = 2
    # Killed while writing the first checkpoint (a fresh start again), and after logging
    # iteration 3 (resumed from 2; iteration 3's metrics and samples lines are written again).
    resumes_like_straight(rl.run, c, [("checkpoint", 2, None), ("log", 3, 2)])


def test_fill_groups_replaces_groups_of_equal_rewards_and_fills_with_them_when_draws_run_out():
    def draw(scores, tag):
        return {"scores": np.asarray(scores, np.float32), "tag": [f"{tag}{i}" for i in range(len(scores))],
                "x": np.arange(len(scores)) + 100 * tag}

    # Group size 2: draw 0 has one group with signal (the second), draw 1 two, draw 2 is never taken.
    draws = iter([draw([1, 1, 0, 1], 0), draw([0, 1, 2, 2, 3, 4], 1), draw([0, 1], 2)])
    out, stats = rollout.fill_groups(draws, 3, 2)
    assert stats == {"draws": 2, "filled_groups": 0}
    np.testing.assert_array_equal(out["x"], [2, 3, 100, 101, 104, 105])
    assert out["tag"] == ["02", "03", "10", "11", "14", "15"] and next(draws)["x"][0] == 200
    # The cap: two draws with one group of signal between them; dropped groups fill in draw order.
    out, stats = rollout.fill_groups([draw([1, 1, 0, 1], 0), draw([5, 5], 1)], 3, 2)
    assert stats == {"draws": 2, "filled_groups": 2}
    np.testing.assert_array_equal(out["x"], [2, 3, 0, 1, 100, 101])


PROMPTS_SEEN = []


def constant_reward(prompt: str, completion: str) -> float:
    PROMPTS_SEEN.append(prompt)
    return 0.5


def test_dynamic_sampling_draws_fresh_prompts_while_groups_tie_up_to_its_cap(sft_dir, tmp_path):
    c = rl_cfg("dapo", sft_dir)
    c.reward.function = "test_rl:constant_reward"
    c.rl.dynamic_max_retries, c.rl.overlong_buffer = 2, 0
    PROMPTS_SEEN.clear()
    row = read_metrics_after(c, tmp_path)[-1]
    # Every group ties: three prompt batches drawn (the cap), then the tied groups fill the batch.
    assert row["dynamic/draws"] == 3 and row["dynamic/filled_groups"] == c.rl.rollout_batch
    assert row["group/zero_advantage_share"] == 1.0
    n = c.rl.rollout_batch * c.rl.group_size
    batches = [tuple(PROMPTS_SEEN[i:i + n]) for i in range(0, len(PROMPTS_SEEN), n)]
    assert len(batches) == 3 and len(set(batches)) == 3


LETTER_SCORES = []


def recorded_letter_share(prompt: str, completion: str) -> float:
    LETTER_SCORES.append(letter_share(prompt, completion))
    return LETTER_SCORES[-1]


def test_dynamic_sampling_keeps_a_batch_with_signal_and_overlong_shaping_is_added_to_the_reward(sft_dir, tmp_path):
    c = rl_cfg("dapo", sft_dir)
    c.reward.function = "test_rl:recorded_letter_share"
    c.rl.overlong_buffer = c.rl.max_new_tokens  # the penalty is -length / max_new_tokens
    LETTER_SCORES.clear()
    row = read_metrics_after(c, tmp_path)[-1]
    assert row["dynamic/draws"] == 1 and row["dynamic/filled_groups"] == 0
    want = np.mean(LETTER_SCORES) - row["response_length"] / c.rl.max_new_tokens
    np.testing.assert_allclose(row["objective/scores"], want, rtol=1e-5)


def grouped_rollout(seed=0, groups=3, g=4, width=6, n=5, vocab=97):
    """Rollout-layout rows (`steps.join_prompt_completion`): `groups` prompts of different lengths,
    each repeated over its g consecutive completions, some ended early (padding after them)."""
    rng = np.random.default_rng(seed)
    lens = np.repeat(np.array([width, 2, 4][:groups], np.int32), g)
    prompts = np.repeat(rng.integers(1, vocab, (groups, width)).astype(np.int32), g, axis=0)
    prompts[np.arange(width)[None, :] >= lens[:, None]] = 0
    completion = rng.integers(1, vocab, (groups * g, n)).astype(np.int32)
    completion_lens = rng.integers(1, n + 1, groups * g).astype(np.int32)
    completion[np.arange(n)[None, :] >= completion_lens[:, None]] = 0
    seq = steps.join_prompt_completion(prompts, lens, completion, completion_lens)
    return {k: np.asarray(v) for k, v in seq.items()}


@pytest.mark.parametrize("model", [dict(), dict(attention="blockwise", attention_block_q=8, attention_block_k=8),
                                   dict(loss_chunk=7, tie_embeddings=False)], ids=["xla", "blockwise", "chunked"])
def test_a_group_as_one_shared_prefix_row_gives_each_row_s_log_probs_entropy_values_and_gradients(model):
    """response_forward with group_size (one row per group, the prompt read once) against one row
    per completion, on the live tokens; and the GRPO loss's gradients with rl.shared_prefix."""
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scalar_head=True,
                      **model)
    m = Transformer(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    seq, width = grouped_rollout(), 6
    rows = rollout.group_rows(seq, width, 4)
    assert rows["tokens"].shape == (3, width - 1 + 4 * 5)
    mask = seq["mask"]
    shared = jax.jit(lambda p, s: rollout.response_forward(m, p, s, width, group_size=4))(params, seq)
    plain = jax.jit(lambda p, s: rollout.response_forward(m, p, s, width))(params, seq)
    for a, b in zip(shared, plain):
        np.testing.assert_allclose(np.asarray(a) * mask, np.asarray(b) * mask, atol=2e-5)
    # Rows that are not whole groups (a benchmark's single row) run one forward row each.
    part = {k: v[:2] for k, v in seq.items()}
    np.testing.assert_array_equal(rollout.response_forward(m, params, part, width, group_size=4)[0],
                                  rollout.response_forward(m, params, part, width)[0])
    rng = np.random.default_rng(1)
    batch = dict(seq, old_logps=np.asarray(plain[0]) - 0.05 * rng.random(mask.shape, np.float32),
                 ref_logps=np.asarray(plain[0]) + 0.05 * rng.random(mask.shape, np.float32),
                 advantages=rng.normal(size=mask.shape).astype(np.float32) * mask,
                 kl_coef=np.full((12,), 0.04, np.float32))
    grpo = common.rl_config(grpo_config.get_config("tiny"))
    grads = {}
    for on in ("on", "off"):
        rl_cfg = dataclasses.replace(grpo, shared_prefix=on, ent_coef=0.01)
        loss = lambda p: rollout.rl_loss_fn({"policy": p}, batch, policy_model=m, critic_model=None, width=width,
                                            rl_cfg=rl_cfg)[0]
        grads[on] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(grads["on"][0], grads["off"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads["on"][1], grads["off"][1])


def test_shared_prefix_minibatches_hold_whole_groups_and_bad_settings_are_named():
    grpo = common.rl_config(grpo_config.get_config("tiny"))
    assert grpo.shared_prefix == "auto" and grpo.shared_group == grpo.group_size == 4
    order = rollout.update_order(24, grpo, np.random.default_rng(0))
    assert sorted(order) == list(range(24))
    blocks = order.reshape(-1, 4)
    assert (blocks[:, 0] % 4 == 0).all() and (np.diff(blocks, axis=1) == 1).all()
    plain = dataclasses.replace(grpo, shared_prefix="off")
    np.testing.assert_array_equal(rollout.update_order(24, plain, np.random.default_rng(0)),
                                  np.random.default_rng(0).permutation(24))
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(grpo, rollout_batch=3, minibatch_size=6)  # 12 rows, minibatches of 1.5 groups
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(common.rl_config(ppo_config.get_config("tiny")), shared_prefix="on")
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(grpo, shared_prefix="yes")


def test_auto_shares_a_prefix_where_it_costs_less():
    """The bench model (d_model 512, 8 layers): one row per group of 4 paid at a 64-token prompt and
    64-token completions (1.36x faster) and lost at 256-token ones (1.7x slower) on the 2-core CPU."""
    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=1536)
    assert rollout.shared_prefix_pays(cfg, 64, 64, 4) and not rollout.shared_prefix_pays(cfg, 64, 256, 4)
    assert rollout.shared_prefix_pays(cfg, 512, 64, 8)  # a long prompt: its copies dominate
    assert not rollout.shared_prefix_pays(cfg, 1, 64, 4)  # nothing to share


def always_half(prompt: str, completion: str) -> float:
    return 0.5


def test_dynamic_sampling_without_a_group_with_signal_for_max_idle_iterations_stops_saying_why(sft_dir, tmp_path):
    c = rl_cfg("dapo", sft_dir, steps=4)
    c.reward.function = "test_rl:always_half"
    c.rl.dynamic_max_retries, c.rl.dynamic_max_idle_iterations, c.rl.overlong_buffer = 0, 2, 0
    with pytest.raises(metrics.StalledError, match=r"^no group with a reward spread kept for 2 iterations in a row "
                                                   r"\(steps 1-2\): .*rl.dynamic_max_retries$"):
        rl.run(c, str(tmp_path))
