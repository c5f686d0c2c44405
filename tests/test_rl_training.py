"""ptx.rl_training: a group as one shared-prefix row (log-probs, entropy, values, gradients), minibatches
of whole groups, where sharing a prefix pays."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from configs import ppo as ppo_config
from ptx import logprobs, rl_training
from ptx.model import ModelConfig, Transformer, init_params


def grouped_rollout(seed=0, groups=3, g=4, width=6, n=5, vocab=97):
    """Rollout-layout rows (`logprobs.join_prompt_completion`): `groups` prompts of different lengths,
    each repeated over its g consecutive completions, some ended early (padding after them)."""
    rng = np.random.default_rng(seed)
    lens = np.repeat(np.array([width, 2, 4][:groups], np.int32), g)
    prompts = np.repeat(rng.integers(1, vocab, (groups, width)).astype(np.int32), g, axis=0)
    prompts[np.arange(width)[None, :] >= lens[:, None]] = 0
    completion = rng.integers(1, vocab, (groups * g, n)).astype(np.int32)
    completion_lens = rng.integers(1, n + 1, groups * g).astype(np.int32)
    completion[np.arange(n)[None, :] >= completion_lens[:, None]] = 0
    seq = logprobs.join_prompt_completion(prompts, lens, completion, completion_lens)
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
    rows = rl_training.group_rows(seq, width, 4)
    assert rows["tokens"].shape == (3, width - 1 + 4 * 5)
    mask = seq["mask"]
    shared = jax.jit(lambda p, s: rl_training.response_forward(m, p, s, width, group_size=4))(params, seq)
    plain = jax.jit(lambda p, s: rl_training.response_forward(m, p, s, width))(params, seq)
    for a, b in zip(shared, plain):
        np.testing.assert_allclose(np.asarray(a) * mask, np.asarray(b) * mask, atol=2e-5)
    # Rows that are not whole groups (a benchmark's single row) run one forward row each.
    part = {k: v[:2] for k, v in seq.items()}
    np.testing.assert_array_equal(rl_training.response_forward(m, params, part, width, group_size=4)[0],
                                  rl_training.response_forward(m, params, part, width)[0])
    rng = np.random.default_rng(1)
    batch = dict(seq, old_logps=np.asarray(plain[0]) - 0.05 * rng.random(mask.shape, np.float32),
                 ref_logps=np.asarray(plain[0]) + 0.05 * rng.random(mask.shape, np.float32),
                 advantages=rng.normal(size=mask.shape).astype(np.float32) * mask,
                 kl_coef=np.full((12,), 0.04, np.float32))
    grpo = rl_training.RLConfig(**grpo_config.get_config("tiny").rl)
    grads = {}
    for on in ("on", "off"):
        rl_cfg = dataclasses.replace(grpo, shared_prefix=on, ent_coef=0.01)
        loss = lambda p: rl_training.rl_loss_fn({"policy": p}, batch, policy_model=m, critic_model=None, width=width,
                                            rl_cfg=rl_cfg)[0]
        grads[on] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(grads["on"][0], grads["off"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads["on"][1], grads["off"][1])


def test_shared_prefix_minibatches_hold_whole_groups_and_bad_settings_are_named():
    grpo = rl_training.RLConfig(**grpo_config.get_config("tiny").rl)
    assert grpo.shared_prefix == "auto" and grpo.shared_group == grpo.group_size == 4
    order = rl_training.update_order(24, grpo, np.random.default_rng(0))
    assert sorted(order) == list(range(24))
    blocks = order.reshape(-1, 4)
    assert (blocks[:, 0] % 4 == 0).all() and (np.diff(blocks, axis=1) == 1).all()
    plain = dataclasses.replace(grpo, shared_prefix="off")
    np.testing.assert_array_equal(rl_training.update_order(24, plain, np.random.default_rng(0)),
                                  np.random.default_rng(0).permutation(24))
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(grpo, rollout_batch=3, minibatch_size=6)  # 12 rows, minibatches of 1.5 groups
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(rl_training.RLConfig(**ppo_config.get_config("tiny").rl), shared_prefix="on")
    with pytest.raises(ValueError, match="shared_prefix"):
        dataclasses.replace(grpo, shared_prefix="yes")


def test_auto_shares_a_prefix_where_it_costs_less():
    """The bench model (d_model 512, 8 layers): one row per group of 4 paid at a 64-token prompt and
    64-token completions (1.36x faster) and lost at 256-token ones (1.7x slower) on the 2-core CPU."""
    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=1536)
    assert rl_training.shared_prefix_pays(cfg, 64, 64, 4) and not rl_training.shared_prefix_pays(cfg, 64, 256, 4)
    assert rl_training.shared_prefix_pays(cfg, 512, 64, 8)  # a long prompt: its copies dominate
    assert not rl_training.shared_prefix_pays(cfg, 1, 64, 4)  # nothing to share
