"""The RL stage (PPO / GRPO / RLOO / DAPO): first-minibatch ratio, zero KL at the reference, learning a
known reward, resume, dynamic sampling, and the same run on every mesh."""
import jax
import numpy as np
import pytest

from configs import ppo as ppo_config
from ptx import losses, metrics, rl_training, rollout, sampler, sharding
from ptx.model import Transformer
from ptx.stages import common, rl

from conftest import assert_rl_metrics_close, assert_trees_close, host_params, read_metrics, rl_cfg
from reward_fns import letter_share

# Every test here runs a stage end to end (see pyproject.toml's markers).
pytestmark = pytest.mark.stage


def rollout_at_the_reference(kind, sft_dir, old_logprobs, kl_coef=0.1, no_reference=False):
    """One prepared rollout of 2 prompts x 4 completions from the SFT policy: (config, params,
    policy model, sampler output, prepared batch, metrics). no_reference: rl.kl_coef = 0 in the
    config and no reference parameters passed at all."""
    c = rl_cfg(kind, sft_dir)
    c.rl.old_logprobs = old_logprobs
    if no_reference:
        c.rl.kl_coef = 0.0
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh))
    policy_cfg, critic_cfg, params, ref = rl.build_models(c, mesh, common.training(c), common.init_source(c))
    policy_model = Transformer(policy_cfg)
    prompts = np.array([[2, 40, 41, 42], [2, 43, 44, 0]], np.int32).repeat(4, axis=0)
    lens = np.array([4, 3], np.int32).repeat(4)
    gen = sampler.make_generate_fn(policy_cfg, max_new_tokens=8, eos_id=3, group_size=4)
    out = gen(params["policy"], prompts, lens, jax.random.split(jax.random.PRNGKey(0), 8))
    seq = rollout.build_sequences(prompts, lens, out, pad_id=0)
    scores = np.linspace(0, 1, 8).astype(np.float32)
    batch, m = rl_training.prepare(params, None if no_reference else ref, seq, scores, kl_coef,
                                   policy_model=policy_model, critic_model=None, width=4,
                                   rl_cfg=rl_training.RLConfig(**c.rl))
    return c, params, policy_model, out, batch, m


def first_minibatch_metrics(c, params, policy_model, batch):
    first = jax.tree_util.tree_map(lambda x: x[:4], batch)
    return rl_training.rl_loss_fn(params, first, policy_model=policy_model, critic_model=None, width=4,
                              rl_cfg=rl_training.RLConfig(**c.rl))[1]


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
    loss = lambda cfg, b: rl_training.rl_loss_fn(params, jax.tree_util.tree_map(lambda x: x[:4], b),
                                             policy_model=policy_model, critic_model=None, width=4,
                                             rl_cfg=rl_training.RLConfig(**cfg.rl))[0]
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
    return read_metrics(workdir, "loss")


def test_ppo_resume_restores_the_kl_controller_and_continues(sft_dir, tmp_path):
    c = rl_cfg("ppo", sft_dir, steps=2)
    c.rl.adaptive_kl, c.rl.kl_target, c.rl.kl_horizon = True, 0.001, 10
    c.train.ckpt_every = 1
    rl.run(c, str(tmp_path))
    first = read_metrics(tmp_path, "loss")
    c.train.steps = 3
    rl.run(c, str(tmp_path))
    rows = read_metrics(tmp_path, "loss")
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


PROMPTS_SEEN = []


def constant_reward(prompt: str, completion: str) -> float:
    PROMPTS_SEEN.append(prompt)
    return 0.5


def test_dynamic_sampling_draws_fresh_prompts_while_groups_tie_up_to_its_cap(sft_dir, tmp_path):
    c = rl_cfg("dapo", sft_dir)
    c.reward.function = "test_stage_rl:constant_reward"
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
    c.reward.function = "test_stage_rl:recorded_letter_share"
    c.rl.overlong_buffer = c.rl.max_new_tokens  # the penalty is -length / max_new_tokens
    LETTER_SCORES.clear()
    row = read_metrics_after(c, tmp_path)[-1]
    assert row["dynamic/draws"] == 1 and row["dynamic/filled_groups"] == 0
    want = np.mean(LETTER_SCORES) - row["response_length"] / c.rl.max_new_tokens
    np.testing.assert_allclose(row["objective/scores"], want, rtol=1e-5)


def ppo(rl_models, mesh, old_logprobs="sampler"):
    c = ppo_config.get_config("tiny")
    c.data.train = rl_models["prompts"]
    # The critic starts from the reward model, so the update trains two parameter trees.
    c.init.checkpoint, c.reward.checkpoint, c.rl.critic = rl_models["sft"], rl_models["rm"], "reward"
    c.train.steps, c.train.ckpt_every = 2, 0
    c.rl.old_logprobs = old_logprobs
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


# The sampler's old log-probs come from the decode program, whose reductions each mesh splits
# differently (rounding ~1e-6); AdamW's normalised step turns such rounding in a near-zero
# gradient into a visible difference (2.6e-5 seen), still far below one step of lr 3e-4.
@pytest.mark.parametrize("old_logprobs,param_atol", [("forward", 2e-5), ("sampler", 1e-4)])
def test_ppo_gives_the_same_samples_metrics_and_parameters_on_every_mesh_as_on_one_device(
        rl_models, tmp_path, old_logprobs, param_atol):
    rl.run(ppo(rl_models, (1, 1, 1), old_logprobs), str(tmp_path / "one"), devices=jax.devices()[:1])
    ref, ref_params = read_metrics(tmp_path / "one"), host_params(tmp_path / "one")
    assert ref[0]["objective/scores"] != 0 and ref[0]["loss/value"] > 0
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        workdir = tmp_path / "x".join(map(str, mesh))
        rl.run(ppo(rl_models, mesh, old_logprobs), str(workdir))
        assert_rl_metrics_close(read_metrics(workdir), ref, rtol=1e-4, atol=1e-5, label=mesh)
        assert_trees_close(host_params(workdir), ref_params, atol=param_atol)


def test_dynamic_sampling_without_a_group_with_signal_for_max_idle_iterations_stops_saying_why(sft_dir, tmp_path):
    c = rl_cfg("dapo", sft_dir, steps=4)
    c.reward.function = "test_stage_rl:constant_reward"
    c.rl.dynamic_max_retries, c.rl.dynamic_max_idle_iterations, c.rl.overlong_buffer = 0, 2, 0
    with pytest.raises(metrics.StalledError, match=r"^no group with a reward spread kept for 2 iterations in a row "
                                                   r"\(steps 1-2\): .*rl.dynamic_max_retries$"):
        rl.run(c, str(tmp_path))


def test_grpo_with_the_paged_engine_on_one_device_runs_as_with_the_static_sampler(sft_dir, tmp_path):
    """rl.engine=paged (mesh.data=1, one device): the same sampled completions, metrics and parameters
    as rl.engine=static; on the 8-device mesh the run is refused before its workdir is written."""
    runs = {}
    for kind in ("static", "paged"):
        c = rl_cfg("grpo", sft_dir, steps=2)
        c.mesh.data, c.rl.engine = 1, kind
        rl.run(c, str(tmp_path / kind), devices=jax.devices()[:1])
        runs[kind] = read_metrics(tmp_path / kind)
    assert_rl_metrics_close(runs["paged"], runs["static"], rtol=1e-5, atol=1e-6, label="paged")
    # The update's old log-probs are the decoders' own (rl.old_logprobs=sampler), equal in their last bits; AdamW's
    # normalised step turns that into up to ~1.5e-6 in a parameter (seen), as across meshes above.
    assert_trees_close(host_params(tmp_path / "paged"), host_params(tmp_path / "static"), atol=1e-5)
    c.mesh.data = -1
    with pytest.raises(ValueError, match=r"rl\.engine='paged' runs on one device"):
        rl.run(c, str(tmp_path / "eight"))
    assert not (tmp_path / "eight").exists()
