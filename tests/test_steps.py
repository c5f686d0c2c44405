"""ptx.steps: train_step's finite / non-finite updates, pair log-probs and the shared-prefix paths, DPOConfig."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptx import data, steps
from ptx.model import ModelConfig, Transformer, init_params

from conftest import assert_trees_close


def test_train_step_applies_a_finite_update_and_skips_a_nonfinite_one():
    w = jnp.array([1.0, -2.0, 3.0])
    tx = optax.sgd(0.1)
    step = jax.jit(functools.partial(
        steps.train_step, loss_fn=lambda p, batch, _: (batch["scale"] * jnp.sum(p["w"] ** 2), {}),
        tx=tx, lr_fn=lambda _: 0.1, accum_steps=1))
    good, m = step(steps.init_state({"w": w}, tx), {"scale": jnp.float32(1.0)}, None)
    np.testing.assert_allclose(good.params["w"], w - 0.1 * 2 * w, rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"], m["update_norm"]],
                               [np.linalg.norm(2 * w), np.linalg.norm(0.2 * w)], rtol=1e-6)
    assert int(good.step) == 1 and float(m["nonfinite"]) == 0
    bad, m = step(good, {"scale": jnp.float32(np.nan)}, None)
    np.testing.assert_array_equal(bad.params["w"], good.params["w"])
    assert int(bad.step) == 1 and float(m["nonfinite"]) == 1 and float(m["update_norm"]) == 0


def two_row_and_shared_pairs():
    """Pairs of different prompt and response lengths (a one-id prompt among them), right-padded,
    as two rows each and as one shared-prefix row."""
    rng = np.random.default_rng(0)
    docs = {"chosen": [], "rejected": []}
    for prompt, n_chosen, n_rejected in ((5, 4, 9), (1, 6, 2), (9, 3, 3), (3, 11, 7)):
        head = [int(i) for i in rng.integers(3, 200, prompt)]
        for side, n in (("chosen", n_chosen), ("rejected", n_rejected)):
            docs[side].append((head + [int(i) for i in rng.integers(3, 200, n)], [0] * prompt + [1] * n))
    two, shared = (data.pair_arrays(docs["chosen"], docs["rejected"], max_len=24, pad_id=0, shared_prefix=on)
                   for on in (False, True))
    assert shared["inputs"].shape[1] < 2 * 24  # one row, shorter than the two it stands for
    for batch in (two, shared):
        batch["prob_chosen"] = np.ones(4, np.float32)
    return two, shared


def test_two_row_pairs_drop_the_prompt_columns_of_every_row_and_keep_the_log_probs():
    """Targets and loss masks start at the first column any row trains on (a 3-id prompt: column
    2); the summed log-probs equal the plain forward's log-softmax at each side's trained targets."""
    rng = np.random.default_rng(1)
    docs = {"chosen": [], "rejected": []}
    for prompt, n_chosen, n_rejected in ((5, 4, 9), (3, 6, 2), (9, 3, 3)):
        head = [int(i) for i in rng.integers(3, 200, prompt)]
        for side, n in (("chosen", n_chosen), ("rejected", n_rejected)):
            docs[side].append((head + [int(i) for i in rng.integers(3, 200, n)], [0] * prompt + [1] * n))
    two = data.pair_arrays(docs["chosen"], docs["rejected"], max_len=24, pad_id=0)
    assert two["chosen_inputs"].shape == (3, 24)
    for key in ("chosen_targets", "chosen_loss_mask", "rejected_targets", "rejected_loss_mask"):
        assert two[key].shape == (3, 22), key
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    m = Transformer(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    (got_chosen, got_rejected), lengths = jax.jit(functools.partial(steps.pair_logps, m))(params, two)
    for side, got, n in (("chosen", got_chosen, lengths[0]), ("rejected", got_rejected, lengths[1])):
        for r, (seq, trained) in enumerate(docs[side]):
            logp = np.asarray(jax.nn.log_softmax(m.apply({"params": params}, np.asarray([seq[:-1]])).logits[0]))
            want = sum(logp[j, seq[j + 1]] for j in range(len(seq) - 1) if trained[j + 1])
            np.testing.assert_allclose(got[r], want, rtol=1e-5)
            assert n[r] == sum(trained[1:])


@pytest.mark.parametrize("model", [dict(attention="xla"), dict(attention="blockwise", attention_block_q=8,
                                                                 attention_block_k=16, remat="full"),
                                   dict(sliding_window=4)], ids=["xla", "blockwise", "window"])
def test_shared_prefix_dpo_loss_and_gradients_equal_the_two_row_path(model):
    """Equal log-probs, loss and gradients (float32) of `two_row_and_shared_pairs`."""
    two, shared = two_row_and_shared_pairs()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, **model)
    m = Transformer(cfg)
    params, ref = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    loss_fn = steps.make_loss_fn("dpo", m, dpo=steps.DPOConfig(beta=0.5))
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b, ref) for b in (two, shared))
    logps = jax.jit(functools.partial(steps.pair_logps, m))
    (logps_two, lengths_two), (logps_shared, lengths_shared) = logps(params, two), logps(params, shared)
    np.testing.assert_allclose(logps_shared, logps_two, rtol=1e-5)
    np.testing.assert_array_equal(lengths_shared, lengths_two)
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-7)
    orpo = jax.jit(steps.make_loss_fn("orpo", m, orpo=steps.ORPOConfig()))  # ORPO reads the same log-probs
    np.testing.assert_allclose(orpo(params, shared)[0], orpo(params, two)[0], rtol=1e-5)


def test_shared_prefix_reward_loss_and_gradients_equal_the_two_row_path():
    two, shared = two_row_and_shared_pairs()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scalar_head=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # A random head instead of the zero init, so that the trunk has gradients too.
    params["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["scalar_head"]["kernel"].shape)
    grad = jax.jit(jax.value_and_grad(steps.make_loss_fn("reward", Transformer(cfg)), has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b) for b in (two, shared))
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-6)  # float32 sums in another order


@pytest.mark.parametrize("overrides,match", [
    ({"soft_labels": True, "label_smoothing": 0.1}, "set one"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "takes no label_smoothing"),
    ({"gamma": 0.5}, "SimPO margin"),
    ({"loss_type": "simpo", "precompute_ref": True}, "no reference to precompute"),
    ({"beta": 0.0}, "must be positive"),
    ({"loss_type": "kto"}, "dpo.loss_type='kto'"),
])
def test_bad_dpo_configs_are_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        steps.DPOConfig(**overrides)
