"""ptx.losses against independent float64 numpy / plain-Python references."""
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ptx import losses

TOL = dict(rtol=1e-5, atol=1e-6)


def jitted(fn, **static):
    """fn under jax.jit with options baked in: one compile per call site is much
    faster than op-by-op dispatch, and it proves every loss is jit-able."""
    return jax.jit(functools.partial(fn, **static))


@pytest.fixture
def x64():
    """float64 for finite-difference gradient checks; restored afterwards."""
    with jax.enable_x64(True):
        yield


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def ragged_mask(batch, seq, rng):
    """Rows with random left and right padding, plus one all-zero row."""
    mask = np.zeros((batch, seq), np.float32)
    for i in range(batch - 1):
        start = rng.integers(0, seq // 2)
        mask[i, start : rng.integers(start + 1, seq + 1)] = 1.0
    return mask


# --------------------------------------------------------------------------
# Log-probs, entropy, masked helpers, SFT.


def test_sft_loss_matches_numpy_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7, 13)).astype(np.float32) * 3
    targets = rng.integers(0, 13, size=(4, 7)).astype(np.int32)
    mask = ragged_mask(4, 7, rng)
    logp = np_log_softmax(logits.astype(np.float64))
    logp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    ce = -(logp * mask).sum() / mask.sum()
    acc = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()

    np.testing.assert_allclose(jitted(losses.token_logprobs)(logits, targets), logp, **TOL)
    loss, metrics = jitted(losses.sft_loss)(logits, targets, mask)
    np.testing.assert_allclose(loss, ce, **TOL)
    np.testing.assert_allclose(metrics["loss"], ce, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], acc, **TOL)
    assert metrics["num_tokens"] == mask.sum()


def test_argmax_equals_numpy_with_the_lowest_index_among_ties():
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 3, size=(50, 9)).astype(np.float32)  # many tied maxima
    x[0] = -np.inf
    x[1, 4] = np.inf
    np.testing.assert_array_equal(jitted(losses.argmax)(x), x.argmax(-1))


def test_sft_loss_of_empty_mask_is_zero_not_nan():
    logits, targets, mask = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))
    loss, metrics = jitted(losses.sft_loss)(logits, targets, mask)
    assert loss == 0.0 and metrics["accuracy"] == 0.0


def test_token_logprobs_of_bfloat16_logits_are_computed_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 50)) * 5, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 50, size=(2, 3)), jnp.int32)
    out = jitted(losses.token_logprobs)(logits, targets)
    assert out.dtype == jnp.float32
    logp = np_log_softmax(np.asarray(logits, np.float64))
    ref = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, ref, **TOL)


def test_token_entropy_matches_numpy():
    logits = np.random.default_rng(2).normal(size=(3, 4, 9)).astype(np.float32) * 2
    logp = np_log_softmax(logits.astype(np.float64))
    want = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(jitted(losses.token_entropy)(logits), want, **TOL)


def head_case(vocab_major, dtype=np.float32, seed=5, b=2, t=7, d=8, vocab=37):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), dtype)
    head = jnp.asarray(rng.standard_normal((vocab, d) if vocab_major else (d, vocab)), dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    return hidden, head, targets


def full_logits(hidden, head, vocab_major):
    return jnp.dot(hidden, head.T if vocab_major else head)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_head_log_probs_equal_the_full_logits_path_in_values_and_gradients(vocab_major, entropy):
    hidden, head, targets = head_case(vocab_major)

    def loss(fn):
        def f(hidden, head):
            out = fn(hidden, head)
            logp, ent = out if entropy else (out, 0.0)
            return jnp.sum(jnp.sin(logp)) + jnp.sum(jnp.cos(ent)), out
        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(hidden, head)

    def full(hidden, head):
        logits = full_logits(hidden, head, vocab_major)
        logp = losses.token_logprobs(logits, targets)
        return (logp, losses.token_entropy(logits)) if entropy else logp

    ref_grads, ref = loss(full)
    for chunk_size in (4, 14, 100):  # 14 tokens: a padded last chunk, whole chunks, one chunk
        grads, out = loss(lambda h, w: losses.chunked_token_logprobs(
            h, w, targets, vocab_major=vocab_major, chunk_size=chunk_size, entropy=entropy))
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5), out, ref)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_chunked_head_gradients_match_finite_differences(x64):
    hidden, head, targets = head_case(False, np.float64, b=1, t=5, d=4, vocab=6)
    fn = lambda h, w: losses.chunked_token_logprobs(h, w, targets, chunk_size=2, entropy=True)
    check_grads(fn, (hidden, head), order=1, modes=["rev"])


def test_chunked_head_of_bfloat16_hidden_states_is_float32_within_bfloat16_rounding():
    hidden, head, targets = head_case(True, jnp.bfloat16)
    out = losses.chunked_token_logprobs(hidden, head.astype(jnp.float32), targets, vocab_major=True,
                                        chunk_size=4)
    assert out.dtype == jnp.float32
    # XLA may keep the bfloat16 product in float32 where the cast follows it: equal
    # to the full path up to one bfloat16 rounding of the logits.
    np.testing.assert_allclose(out, losses.token_logprobs(full_logits(hidden, head, True), targets),
                               rtol=2e-2, atol=2e-2)


def test_chunked_head_keeps_no_vocabulary_sized_buffer():
    """Compiled only: forward and backward temporaries of 4 x 128 tokens over 4096 words."""
    hidden = jax.ShapeDtypeStruct((4, 128, 32), jnp.float32)
    head = jax.ShapeDtypeStruct((32, 4096), jnp.float32)
    targets = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def temp_bytes(fn):
        loss = lambda h, w, y: jnp.sum(fn(h, w, y))
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head, targets).compile() \
            .memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 128 * 4096 * 4
    full = temp_bytes(lambda h, w, y: losses.token_logprobs(jnp.dot(h, w), y))
    chunked = temp_bytes(lambda h, w, y: losses.chunked_token_logprobs(h, w, y, chunk_size=64))
    assert full >= logits_bytes and chunked < logits_bytes / 4

def test_masked_sum_mean_and_whiten_match_numpy_over_masked_entries():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32) * 2 + 1
    mask = ragged_mask(4, 6, rng)
    sel = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(jitted(losses.masked_sum)(x, mask), sel.sum(), **TOL)
    np.testing.assert_allclose(jitted(losses.masked_mean)(x, mask), sel.mean(), **TOL)
    rows = [x[i][mask[i] > 0].mean() if mask[i].any() else 0.0 for i in range(4)]
    np.testing.assert_allclose(jitted(losses.masked_mean, axis=-1)(x, mask), rows, **TOL)

    whitened = (sel - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    out = np.asarray(jitted(losses.masked_whiten)(x, mask))
    np.testing.assert_allclose(out[mask > 0], whitened, **TOL)
    assert np.all(out[mask == 0] == 0)
    out = np.asarray(jitted(losses.masked_whiten, shift_mean=False)(x, mask))
    np.testing.assert_allclose(out[mask > 0], whitened + sel.mean(), **TOL)


def test_masked_reductions_ignore_inf_and_nan_in_padding():
    x = jnp.array([[1.0, -jnp.inf], [2.0, jnp.nan]])
    mask = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    assert jitted(losses.masked_sum)(x, mask) == 3.0
    np.testing.assert_allclose(jitted(losses.masked_mean, axis=-1)(x, mask), [1.0, 2.0])


def test_sequence_logps_sum_and_length_normalised():
    tok = jnp.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    total = jitted(losses.sequence_logps)(tok, mask)
    mean = jitted(losses.sequence_logps, normalize=True)(tok, mask)
    np.testing.assert_allclose(total, [-5.0, -4.0])
    np.testing.assert_allclose(mean, [-2.5, -4.0])


# --------------------------------------------------------------------------
# Pairwise reward model.


def test_pairwise_reward_loss_hard_label_matches_numpy():
    rng = np.random.default_rng(4)
    rc, rr, margin = (rng.normal(size=8).astype(np.float32) for _ in range(3))
    d = rc.astype(np.float64) - rr - margin
    center = 0.1 * np.mean((rc.astype(np.float64) + rr) ** 2)
    loss, metrics = jitted(losses.pairwise_reward_loss, center_coef=0.1)(rc, rr, margin)
    np.testing.assert_allclose(loss, -np_log_sigmoid(d).mean() + center, **TOL)
    np.testing.assert_allclose(metrics["loss"], loss)
    loss, _ = jitted(losses.pairwise_reward_loss)(rc, rr)
    np.testing.assert_allclose(loss, -np_log_sigmoid(rc.astype(np.float64) - rr).mean(), **TOL)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_pairwise_reward_loss_soft_label_matches_numpy(p):
    rng = np.random.default_rng(5)
    rc, rr = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    d = rc.astype(np.float64) - rr
    ref = -(p * np_log_sigmoid(d) + (1 - p) * np_log_sigmoid(-d)).mean()
    loss, _ = jitted(losses.pairwise_reward_loss)(rc, rr, prob_chosen=jnp.full(8, p))
    np.testing.assert_allclose(loss, ref, **TOL)
    if p == 1.0:
        np.testing.assert_array_equal(loss, jitted(losses.pairwise_reward_loss)(rc, rr)[0])


def test_pairwise_reward_metrics():
    rc, rr = jnp.array([2.0, 0.0, 1.0, 1.0]), jnp.array([1.0, 3.0, 1.0, -1.0])
    _, m = jitted(losses.pairwise_reward_loss)(rc, rr, margin=jnp.full(4, 5.0))
    both = np.array([2.0, 0.0, 1.0, 1.0, 1.0, 3.0, 1.0, -1.0])
    np.testing.assert_allclose(m["accuracy"], 0.5)  # the tie counts 0; the margin is ignored
    np.testing.assert_allclose(m["margin_mean"], np.mean([1.0, -3.0, 0.0, 2.0]))
    np.testing.assert_allclose(m["reward_mean"], both.mean(), **TOL)
    np.testing.assert_allclose(m["reward_std"], both.std(), **TOL)


def test_pairwise_reward_gradients_match_finite_differences(x64):
    rng = np.random.default_rng(6)
    rc, rr, p = rng.normal(size=5), rng.normal(size=5), rng.uniform(size=5)
    fn = lambda a, b: losses.pairwise_reward_loss(a, b, prob_chosen=p, center_coef=0.3)[0]
    check_grads(jax.jit(fn), (rc, rr), order=1, modes=["rev"])


# --------------------------------------------------------------------------
# DPO family.


def np_dpo(pc, pr, rc, rr, beta, loss_type, ls=0.0, ref_free=False, p=None, lc=None, lr=None,
           gamma=0.0):
    """TRL's formulas, written out per case in float64."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    if loss_type == "simpo":
        c, r = pc / lc, pr / lr
    elif ref_free:
        c, r = pc, pr
    else:
        c, r = pc - rc, pr - rr
    h = c - r
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2, beta * c, beta * r
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h), beta * c, beta * r
    z = beta * h - gamma
    w = 1 - ls if p is None else p
    return -w * np_log_sigmoid(z) - (1 - w) * np_log_sigmoid(-z), beta * c, beta * r


def dpo_inputs(seed=7, n=6):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-20, 4, size=n).astype(np.float32) for _ in range(4))
    lc, lr = (rng.integers(1, 30, size=n).astype(np.float32) for _ in range(2))
    p = rng.uniform(size=n).astype(np.float32)
    return pc, pr, rc, rr, lc, lr, p


DPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid"),
    "sigmoid_label_smoothing": dict(loss_type="sigmoid", label_smoothing=0.1),
    "sigmoid_reference_free": dict(loss_type="sigmoid", reference_free=True),
    "sigmoid_soft_labels": dict(loss_type="sigmoid", soft=True),
    "ipo": dict(loss_type="ipo"),
    "hinge": dict(loss_type="hinge"),
    "hinge_reference_free": dict(loss_type="hinge", reference_free=True),
    "simpo": dict(loss_type="simpo", gamma=0.5, lengths=True),
    "simpo_label_smoothing": dict(
        loss_type="simpo", gamma=0.3, label_smoothing=0.2, lengths=True),
    "simpo_soft_labels": dict(loss_type="simpo", lengths=True, soft=True),
}


def _dpo_kwargs(case, lc, lr, p):
    kw = dict(case)
    soft, lengths = kw.pop("soft", False), kw.pop("lengths", False)
    if soft:
        kw["prob_chosen"] = p
    if lengths:
        kw.update(chosen_lengths=lc, rejected_lengths=lr)
    return kw


@pytest.mark.parametrize("name", DPO_CASES)
def test_dpo_loss_and_rewards_match_numpy(name):
    pc, pr, rc, rr, lc, lr, p = dpo_inputs()
    kw = _dpo_kwargs(DPO_CASES[name], lc, lr, p)
    beta = 0.3
    out = jitted(losses.dpo_loss, beta=beta, **kw)(pc, pr, rc, rr)
    ref = np_dpo(
        pc, pr, rc, rr, beta, kw["loss_type"], ls=kw.get("label_smoothing", 0.0),
        ref_free=kw.get("reference_free", False), p=kw.get("prob_chosen"),
        lc=lc, lr=lr, gamma=kw.get("gamma", 0.0))
    for got, want in zip(out, ref):
        assert got.shape == (6,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("name", DPO_CASES)
def test_dpo_gradients_match_finite_differences(name, x64):
    pc, pr, rc, rr, lc, lr, p = (a.astype(np.float64) for a in dpo_inputs(seed=8, n=4))
    kw = _dpo_kwargs(DPO_CASES[name], lc, lr, p)
    # Distinct weights per pair, so a gradient routed to the wrong pair shows.
    weights = jnp.arange(1.0, 5.0)
    fn = lambda a, b: jnp.sum(losses.dpo_loss(a, b, rc, rr, beta=0.1, **kw)[0] * weights)
    check_grads(jax.jit(fn), (pc, pr), order=1, modes=["rev"])


def test_dpo_sigmoid_gradient_is_minus_beta_sigmoid_of_minus_beta_logits():
    pc, pr, rc, rr, *_ = dpo_inputs()
    beta = 0.5
    grad = jax.jit(jax.grad(lambda a: losses.dpo_loss(a, pr, rc, rr, beta=beta)[0].sum()))(pc)
    h = (pc.astype(np.float64) - rc) - (pr - rr)
    np.testing.assert_allclose(grad, -beta / (1 + np.exp(beta * h)), **TOL)


@pytest.mark.parametrize("label", ["hard", "label_smoothing", "soft"])
def test_dpo_with_policy_equal_to_reference_is_log2_with_zero_rewards(label):
    pc, pr, *_, p = dpo_inputs()
    kw = {
        "hard": {},
        "label_smoothing": {"label_smoothing": 0.1},
        "soft": {"prob_chosen": p},
    }[label]
    loss, cr, rj = jitted(losses.dpo_loss, beta=0.1, **kw)(pc, pr, pc, pr)
    np.testing.assert_array_equal(loss, np.full(6, math.log(2.0), np.float32))
    np.testing.assert_array_equal(cr, 0.0)
    np.testing.assert_array_equal(rj, 0.0)


def test_dpo_rewards_carry_no_gradient():
    pc, pr, rc, rr, *_ = dpo_inputs()
    for loss_type in ("sigmoid", "ipo"):
        def rewards(a, b):
            _, chosen, rejected = losses.dpo_loss(a, b, rc, rr, beta=0.1, loss_type=loss_type)
            return chosen.sum() + rejected.sum()

        grads = jax.jit(jax.grad(rewards, argnums=(0, 1)))(pc, pr)
        assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_dpo_reference_free_ignores_missing_reference():
    pc, pr, *_ = dpo_inputs()
    loss, cr, _ = jitted(losses.dpo_loss, beta=0.1, reference_free=True)(pc, pr, None, None)
    np.testing.assert_allclose(loss, -np_log_sigmoid(0.1 * (pc.astype(np.float64) - pr)), **TOL)
    np.testing.assert_allclose(cr, 0.1 * pc, **TOL)


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="kto"),
        dict(label_smoothing=0.1, prob_chosen=np.full(6, 0.7, np.float32)),
        dict(loss_type="simpo"),
        dict(loss_type="sigmoid", gamma=0.5),
        dict(loss_type="ipo", label_smoothing=0.1),
        dict(loss_type="hinge", prob_chosen=np.full(6, 0.7, np.float32)),
    ],
)
def test_dpo_rejects_unknown_or_inconsistent_options(kw):
    pc, pr, rc, rr, *_ = dpo_inputs()
    with pytest.raises(ValueError):
        jitted(losses.dpo_loss, beta=0.1, **kw)(pc, pr, rc, rr)


def test_dpo_metrics_are_batch_means_under_trl_names():
    out = jitted(losses.dpo_metrics)(
        jnp.array([1.0, 3.0]), jnp.array([0.5, -1.0]), jnp.array([0.0, 1.0]),
        jnp.array([-10.0, -20.0]), jnp.array([-30.0, -40.0]))
    want = {
        "loss": 2.0, "rewards/chosen": -0.25, "rewards/rejected": 0.5, "rewards/accuracies": 0.5,
        "rewards/margins": -0.75, "logps/chosen": -15.0, "logps/rejected": -35.0,
    }
    assert set(out) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v, err_msg=k)


def test_dpo_loss_jits_with_static_options():
    pc, pr, rc, rr, lc, lr, p = dpo_inputs()
    fn = jitted(losses.dpo_loss, beta=0.2, loss_type="simpo", gamma=0.4)
    out = fn(pc, pr, rc, rr, prob_chosen=p, chosen_lengths=lc, rejected_lengths=lr)
    ref = np_dpo(pc, pr, rc, rr, 0.2, "simpo", p=p, lc=lc, lr=lr, gamma=0.4)
    np.testing.assert_allclose(out[0], ref[0], **TOL)


# --------------------------------------------------------------------------
# KL estimators.


def test_kl_estimators_match_formulas():
    rng = np.random.default_rng(9)
    logp, ref = rng.normal(-3, 1, size=(3, 5)), rng.normal(-3, 1, size=(3, 5))
    logp32, ref32 = logp.astype(np.float32), ref.astype(np.float32)
    d = logp32.astype(np.float64) - ref32
    want = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1}
    for kind, value in want.items():
        kl = jitted(losses.kl_penalty, kind=kind)(logp32, ref32)
        np.testing.assert_allclose(kl, value, **TOL, err_msg=kind)


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    d = jnp.linspace(-10.0, 10.0, 2001)
    k3 = jitted(losses.kl_penalty, kind="k3")
    assert np.all(np.asarray(k3(d, jnp.zeros_like(d))) >= 0)
    x = jnp.array([-3.0, -0.5, -12.0])
    np.testing.assert_array_equal(k3(x, x), 0.0)
    with pytest.raises(ValueError):
        jitted(losses.kl_penalty, kind="k4")(x, x)


# --------------------------------------------------------------------------
# GAE.


def py_gae(rewards, values, mask, gamma, lam):
    """Reverse loop; a valid token's successor is the next valid token (or none)."""
    batch, seq = rewards.shape
    adv, ret = np.zeros((batch, seq)), np.zeros((batch, seq))
    for b in range(batch):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(seq)):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            adv[b, t] = delta + gamma * lam * next_adv
            ret[b, t] = adv[b, t] + values[b, t]
            next_value, next_adv = values[b, t], adv[b, t]
    return adv, ret


def textbook_gae(rewards, values, gamma, lam):
    """Unpadded sequence ending in a terminal state: sum_l (γλ)^l δ_{t+l}."""
    n = len(rewards)
    v_next = np.append(values[1:], 0.0)
    delta = rewards + gamma * v_next - values
    decay = (gamma * lam) ** np.arange(n)
    return np.array([np.sum(decay[: n - t] * delta[t:]) for t in range(n)])


def test_gae_matches_python_loop_on_ragged_masks():
    rng = np.random.default_rng(10)
    rewards = rng.normal(size=(6, 9)).astype(np.float32)
    values = rng.normal(size=(6, 9)).astype(np.float32)
    mask = np.array(
        [
            [1, 1, 1, 1, 1, 1, 1, 1, 1],  # full
            [1, 1, 1, 1, 0, 0, 0, 0, 0],  # right padding
            [0, 0, 0, 1, 1, 1, 1, 1, 1],  # left padding
            [0, 0, 1, 1, 1, 1, 0, 0, 0],  # both
            [0, 1, 1, 0, 0, 1, 1, 0, 0],  # a hole (e.g. tool output)
            [0, 0, 0, 0, 0, 0, 0, 0, 0],  # empty
        ],
        np.float32,
    )
    adv, ret = jitted(losses.gae, gamma=0.97, lam=0.9)(rewards, values, mask)
    want_adv, want_ret = py_gae(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(adv, want_adv, **TOL)
    np.testing.assert_allclose(ret, want_ret, **TOL)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_of_padded_row_equals_textbook_gae_of_unpadded_sequence():
    rng = np.random.default_rng(11)
    rewards = rng.normal(size=(1, 10)).astype(np.float32)
    values = rng.normal(size=(1, 10)).astype(np.float32)
    mask = np.zeros((1, 10), np.float32)
    mask[0, 3:8] = 1.0
    adv, ret = jitted(losses.gae, gamma=0.9, lam=0.8)(rewards, values, mask)
    r, v = rewards[0, 3:8].astype(np.float64), values[0, 3:8].astype(np.float64)
    want = textbook_gae(r, v, 0.9, 0.8)
    np.testing.assert_allclose(adv[0, 3:8], want, **TOL)
    np.testing.assert_allclose(ret[0, 3:8], want + values[0, 3:8], **TOL)


def test_gae_with_unit_gamma_and_lambda_is_reward_to_go_minus_value():
    rewards = jnp.array([[0.0, 0.0, 1.0, 99.0]])
    values = jnp.array([[0.5, 0.2, 0.7, 42.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = jitted(losses.gae, gamma=1.0, lam=1.0)(rewards, values, mask)
    np.testing.assert_allclose(adv, [[0.5, 0.8, 0.3, 0.0]], **TOL)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], **TOL)


# --------------------------------------------------------------------------
# PPO policy and value losses, aggregation.


def test_ppo_policy_loss_hand_cases_and_clipfrac():
    # Tokens: A>0 ratio above the range (clipped), A<0 ratio below it (clipped),
    # A>0 ratio below and A<0 ratio above (pessimistic: unclipped), inside,
    # then a masked token whose huge ratio must not count.
    ratio = np.array([1.5, 0.5, 0.5, 1.5, 1.1, 50.0])
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0, 7.0], np.float32)
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    old = np.array([-1.0, -2.0, -0.5, -3.0, -1.5, -2.0], np.float32)
    logps = (old + np.log(ratio)).astype(np.float32)

    logps, old, adv, mask = logps[None], old[None], adv[None], mask[None]
    loss, m = jitted(losses.ppo_policy_loss, clip_eps=0.2)(logps, old, adv, mask)
    per_token = [-1.2, 0.8, -0.5, 1.5, -2.2]
    np.testing.assert_allclose(loss, np.mean(per_token), **TOL)
    np.testing.assert_allclose(m["loss/policy"], loss)
    np.testing.assert_allclose(m["policy/clipfrac"], 2 / 5, **TOL)
    np.testing.assert_allclose(m["val/ratio"], np.mean(ratio[:5]), **TOL)
    np.testing.assert_allclose(m["policy/approxkl"], 0.5 * np.mean(np.log(ratio[:5]) ** 2), **TOL)

    # Clipped tokens give no gradient; unclipped ones d/dlogp (-A r) = -A r.
    grad = jax.jit(jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask)[0]))(logps)
    want = np.array([0.0, 0.0, -0.5, 1.5, -2.2, 0.0]) / 5
    np.testing.assert_allclose(grad[0], want, **TOL)


def test_ppo_clip_eps_high_widens_only_the_upper_bound():
    old = np.zeros((1, 2), np.float32)
    logps = np.log(np.array([[1.25, 0.75]], np.float32))
    adv = np.array([[1.0, -2.0]], np.float32)
    mask = np.ones((1, 2), np.float32)
    loss, m = jitted(losses.ppo_policy_loss, clip_eps=0.2)(logps, old, adv, mask)
    np.testing.assert_allclose(loss, np.mean([-1.2, 1.6]), **TOL)
    np.testing.assert_allclose(m["policy/clipfrac"], 1.0)
    clip_higher = jitted(losses.ppo_policy_loss, clip_eps=0.2, clip_eps_high=0.28)
    loss, m = clip_higher(logps, old, adv, mask)
    np.testing.assert_allclose(loss, np.mean([-1.25, 1.6]), **TOL)
    np.testing.assert_allclose(m["policy/clipfrac"], 0.5)


def test_ppo_policy_loss_is_finite_with_inf_log_probs_in_padding():
    logps = jnp.array([[-1.0, 0.0]])
    old = jnp.array([[-1.2, -jnp.inf]])
    mask = jnp.array([[1.0, 0.0]])
    fn = lambda lp: losses.ppo_policy_loss(lp, old, jnp.ones((1, 2)), mask)[0]
    assert np.isfinite(jax.jit(fn)(logps))
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(fn))(logps))))


def test_ppo_value_loss_hand_cases():
    old = np.zeros((1, 4), np.float32)
    values = np.array([[0.5, 0.1, 0.5, -0.5]], np.float32)
    returns = np.array([[1.0, 1.0, 0.0, -1.0]], np.float32)
    # Clipped values [0.2, 0.1, 0.2, -0.2]; max of squared errors per token:
    # 0.64 (clipped), 0.81 (inside), 0.25 (clip helps, unclipped kept), 0.64 (clipped).
    mask = np.ones((1, 4), np.float32)
    value_loss = jitted(losses.ppo_value_loss, clip_value=0.2)
    loss, m = value_loss(values, old, returns, mask)
    np.testing.assert_allclose(loss, 0.5 * np.mean([0.64, 0.81, 0.25, 0.64]), **TOL)
    np.testing.assert_allclose(m["loss/value"], loss)
    np.testing.assert_allclose(m["val/clipfrac"], 0.5)
    np.testing.assert_allclose(m["val/vpred"], np.mean(values), **TOL)
    # Where the clipped error wins, the value gets no gradient.
    grad = jax.jit(jax.grad(lambda v: value_loss(v, old, returns, mask)[0]))(values)
    np.testing.assert_allclose(grad[0], [0.0, -0.9 / 4, 0.5 / 4, 0.0], **TOL)
    mask[0, 1] = 0.0
    loss, m = value_loss(values, old, returns, mask)
    np.testing.assert_allclose(loss, 0.5 * np.mean([0.64, 0.25, 0.64]), **TOL)
    np.testing.assert_allclose(m["val/clipfrac"], 2 / 3, **TOL)
    np.testing.assert_allclose(m["val/vpred"], 0.5 / 3, **TOL)


def test_each_aggregation_matches_hand_computation_on_ragged_masks():
    x = np.arange(1.0, 13.0, dtype=np.float32).reshape(3, 4)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    # Row sums 3 and 21 over 2 and 3 tokens; the last row is empty.
    want = {
        "token_mean": 24 / 5,  # every token weighs the same
        "seq_mean_token_mean": (3 / 2 + 21 / 3) / 2,  # the empty row is left out
        "seq_mean_token_sum_norm": (3 / 4 + 21 / 4 + 0) / 3,  # divided by seq = 4, all rows
    }
    for kind, value in want.items():
        np.testing.assert_allclose(jitted(losses.aggregate, kind=kind)(x, mask), value, **TOL)
    with pytest.raises(ValueError):
        jitted(losses.aggregate, kind="sum")(x, mask)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_ppo_policy_loss_uses_the_requested_aggregation(aggregation):
    rng = np.random.default_rng(12)
    old = rng.normal(-2, 0.3, size=(3, 5)).astype(np.float32)
    logps = (old + rng.normal(0, 0.3, size=(3, 5))).astype(np.float32)
    adv = rng.normal(size=(3, 5)).astype(np.float32)
    mask = ragged_mask(3, 5, rng)
    r = np.exp(logps.astype(np.float64) - old)
    per_token = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))
    want = jitted(losses.aggregate, kind=aggregation)(per_token.astype(np.float32), mask)
    fn = jitted(losses.ppo_policy_loss, aggregation=aggregation)
    np.testing.assert_allclose(fn(logps, old, adv, mask)[0], want, **TOL)


# --------------------------------------------------------------------------
# Group advantages and the adaptive KL controller.


@pytest.mark.parametrize("kind", losses.GROUP_ADVANTAGE_KINDS)
def test_group_advantages_match_numpy(kind):
    rewards = np.random.default_rng(13).normal(size=12).astype(np.float32)
    g = rewards.astype(np.float64).reshape(3, 4)
    mean = g.mean(1, keepdims=True)
    want = {
        "grpo": (g - mean) / (g.std(1, ddof=0, keepdims=True) + 1e-6),
        "dr_grpo": g - mean,
        "rloo": np.array([[row[i] - np.delete(row, i).mean() for i in range(4)] for row in g]),
    }[kind]
    out = jitted(losses.group_advantages, group_size=4, kind=kind)(rewards)
    np.testing.assert_allclose(out, want.reshape(-1), **TOL)


@pytest.mark.parametrize("kind", losses.GROUP_ADVANTAGE_KINDS)
def test_group_of_equal_rewards_has_zero_advantage(kind):
    rewards = jnp.array([1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
    out = jitted(losses.group_advantages, group_size=3, kind=kind)(rewards)
    np.testing.assert_array_equal(out, 0.0)


def test_rloo_baseline_excludes_the_sample_itself():
    rewards = jnp.array([1.0, 2.0, 4.0, 0.0])
    moved = rewards.at[2].set(100.0)
    rloo = jitted(losses.group_advantages, group_size=4, kind="rloo")
    base, base_moved = rewards - rloo(rewards), moved - rloo(moved)
    np.testing.assert_allclose(base[2], base_moved[2], **TOL)
    np.testing.assert_allclose(base, [2.0, 5 / 3, 1.0, 7 / 3], **TOL)
    assert not np.allclose(base[0], base_moved[0])


def test_group_advantages_reject_bad_arguments():
    with pytest.raises(ValueError):
        jitted(losses.group_advantages, group_size=3, kind="ppo")(jnp.zeros(6))
    with pytest.raises(ValueError):
        jitted(losses.group_advantages, group_size=4)(jnp.zeros(6))
    with pytest.raises(ValueError):
        jitted(losses.group_advantages, group_size=1, kind="rloo")(jnp.zeros(6))


@pytest.mark.parametrize(
    "current_kl,mult",
    [
        (12.0, 1 + 0.2 * 256 / 10000),  # error 1.0 clipped to 0.2
        (3.0, 1 - 0.2 * 256 / 10000),  # error -0.5 clipped to -0.2
        (6.6, 1 + 0.1 * 256 / 10000),
        (6.0, 1.0),
    ],
)
def test_adaptive_kl_controller_follows_ziegler_et_al(current_kl, mult):
    new = losses.adaptive_kl_update(0.2, current_kl, target=6.0, horizon=10000, n_steps=256)
    np.testing.assert_allclose(new, 0.2 * mult, rtol=1e-6)
    update = jitted(losses.adaptive_kl_update, target=6.0, horizon=10000, n_steps=256)
    new = update(jnp.float32(0.2), jnp.float32(current_kl))
    np.testing.assert_allclose(new, 0.2 * mult, rtol=1e-6)


# --------------------------------------------------------------------------
# KTO, ORPO, GSPO's sequence-level ratio, DAPO's overlong penalty.


def kto_inputs(seed=11, n=6):
    rng = np.random.default_rng(seed)
    pol, ref = rng.normal(-20, 4, n), rng.normal(-20, 4, n)
    kl_pol, kl_ref = rng.normal(-30, 4, n), rng.normal(-30, 4, n)
    labels = np.arange(n) % 3 != 0
    return (*(a.astype(np.float32) for a in (pol, ref, kl_pol, kl_ref)), labels)


def np_kto(pol, ref, kl_pol, kl_ref, labels, beta, wd, wu):
    z0 = max(np.mean(kl_pol.astype(np.float64) - kl_ref), 0.0)
    r = pol.astype(np.float64) - ref
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    return np.where(labels, wd * (1 - sig(beta * (r - z0))), wu * (1 - sig(beta * (z0 - r)))), z0


@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])
def test_kto_loss_and_reference_point_match_numpy(shift):
    pol, ref, kl_pol, kl_ref, labels = kto_inputs()
    kl_pol = kl_pol + shift  # the mean KL estimate positive, or negative (z0 clamped to 0)
    fn = jitted(losses.kto_loss, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    got, z0 = fn(pol, ref, kl_pol, kl_ref, labels)
    want, want_z0 = np_kto(pol, ref, kl_pol, kl_ref, labels, 0.3, 1.5, 0.7)
    assert got.shape == (6,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(z0, want_z0, **TOL)
    if np.mean(kl_pol.astype(np.float64) - kl_ref) < 0:
        assert float(z0) == 0.0


def test_kto_gradients_match_finite_differences_and_z0_is_detached(x64):
    pol, ref, kl_pol, kl_ref, labels = (a.astype(np.float64) if a.dtype != bool else a for a in kto_inputs(n=4))
    kl_pol = kl_pol + 3.0  # z0 > 0: its gradient would be non-zero if it flowed
    weights = jnp.arange(1.0, 5.0)
    kw = dict(beta=0.2, desirable_weight=1.3, undesirable_weight=0.8)
    fn = lambda p: jnp.sum(losses.kto_loss(p, ref, kl_pol, kl_ref, labels, **kw)[0] * weights)
    check_grads(jax.jit(fn), (pol,), order=1, modes=["rev"])
    # Analytic: d/dr of w (1 - σ(β (r - z0))) = -w β σ'(·); undesirable rows the opposite sign.
    z0 = np.mean(kl_pol - kl_ref)
    r = pol - ref
    s_good, s_bad = 1 / (1 + np.exp(-0.2 * (r - z0))), 1 / (1 + np.exp(-0.2 * (z0 - r)))
    want = np.where(labels, -1.3 * 0.2 * s_good * (1 - s_good), 0.8 * 0.2 * s_bad * (1 - s_bad)) * np.arange(1, 5)
    np.testing.assert_allclose(jax.grad(fn)(pol), want, rtol=1e-10)
    # The reference point is held constant: no gradient reaches the mismatched pairs' log-probs.
    through_z0 = jax.grad(lambda k: jnp.sum(losses.kto_loss(pol, ref, k, kl_ref, labels, **kw)[0]))(kl_pol)
    np.testing.assert_array_equal(through_z0, 0.0)
    z0_grad = jax.grad(lambda k: losses.kto_loss(pol, ref, k, kl_ref, labels, **kw)[1])(kl_pol)
    np.testing.assert_array_equal(z0_grad, 0.0)


def test_kto_metrics_average_desirable_and_undesirable_rows_under_trl_names():
    pol, ref = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -2.0, -1.0])
    labels = jnp.array([True, True, False])
    out = jitted(losses.kto_metrics, beta=0.5)(jnp.array([0.1, 0.2, 0.3]), pol, ref, labels, jnp.float32(0.25))
    want = {"loss": 0.2, "rewards/chosen": 0.25, "rewards/rejected": -1.0, "rewards/margins": 1.25,
            "logps/chosen": -1.5, "logps/rejected": -3.0, "kl": 0.25, "count/chosen": 2, "count/rejected": 1}
    assert set(out) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v, rtol=1e-6, err_msg=k)


def orpo_inputs(seed=12, n=6):
    rng = np.random.default_rng(seed)
    lc, lr = rng.integers(1, 12, n).astype(np.float32), rng.integers(1, 12, n).astype(np.float32)
    # Mean token log-probs from -4 to -0.05: both branches of log(1 - e^x) are taken.
    pc = (rng.uniform(-4, -0.05, n) * lc).astype(np.float32)
    pr = (rng.uniform(-4, -0.05, n) * lr).astype(np.float32)
    return pc, pr, lc, lr


def np_orpo(pc, pr, lc, lr, lam):
    c, r = pc.astype(np.float64) / lc, pr.astype(np.float64) / lr
    odds = lambda x: np.exp(x) / (1 - np.exp(x))
    log_odds = np.log(odds(c)) - np.log(odds(r))
    return -c + lam * np.log1p(np.exp(-log_odds)), -c, log_odds


def test_orpo_loss_nll_and_log_odds_match_numpy():
    pc, pr, lc, lr = orpo_inputs()
    out = jitted(losses.orpo_loss, lam=0.25)(pc, pr, lc, lr)
    for got, want in zip(out, np_orpo(pc, pr, lc, lr, 0.25)):
        assert got.shape == (6,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_orpo_gradients_match_finite_differences(x64):
    pc, pr, lc, lr = (a.astype(np.float64) for a in orpo_inputs(seed=13, n=4))
    weights = jnp.arange(1.0, 5.0)
    fn = lambda a, b: jnp.sum(losses.orpo_loss(a, b, lc, lr, lam=0.5)[0] * weights)
    check_grads(jax.jit(fn), (pc, pr), order=1, modes=["rev"])


def test_orpo_is_finite_at_probability_one_and_for_empty_rows():
    zeros, ones = jnp.zeros(2), jnp.array([3.0, 0.0])
    fn = lambda a: losses.orpo_loss(a, jnp.array([-5.0, -1.0]), ones, ones, lam=0.1)[0].sum()
    assert np.isfinite(jax.jit(fn)(zeros))
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(fn))(zeros))))


def test_orpo_metrics_under_trl_names():
    pc, pr, lc, lr = orpo_inputs()
    out = jitted(losses.orpo_metrics, lam=0.25)(*losses.orpo_loss(pc, pr, lc, lr, lam=0.25), pc, pr, lc, lr)
    _, nll, log_odds = np_orpo(pc, pr, lc, lr, 0.25)
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/margins",
            "logps/chosen"} <= set(out)
    np.testing.assert_allclose(out["nll_loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["log_odds_ratio"], np.mean(-np.log1p(np.exp(-log_odds))), rtol=1e-5)
    np.testing.assert_allclose(out["logps/chosen"], np.mean(pc / lc), rtol=1e-5)


def np_gspo(logps, old, adv, mask, eps_low, eps_high):
    """GSPO's objective: mean over sequences of max(-A s, -A clip(s)), s the length-normalised ratio."""
    out = []
    for lp, o, a, m in zip(logps.astype(np.float64), old, adv, mask):
        if m.sum() == 0:
            continue
        s = np.exp(np.sum((lp - o) * m) / m.sum())
        out.append(max(-a * s, -a * np.clip(s, 1 - eps_low, 1 + eps_high)))
    return np.mean(out)


def gspo_inputs(seed=14):
    rng = np.random.default_rng(seed)
    mask = ragged_mask(5, 7, rng)
    old = rng.normal(-2, 0.5, (5, 7)).astype(np.float32)
    logps = (old + rng.normal(0, 0.3, (5, 7))).astype(np.float32)
    adv = rng.normal(size=5).astype(np.float32)
    return logps, old, adv, mask


@pytest.mark.parametrize("eps", [(0.2, 0.28), (3e-4, 4e-4)])
def test_sequence_level_ratio_is_gspo_against_numpy(eps):
    logps, old, adv, mask = gspo_inputs()
    fn = jitted(losses.ppo_policy_loss, clip_eps=eps[0], clip_eps_high=eps[1], aggregation="seq_mean_token_mean",
                ratio_level="sequence")
    loss, m = fn(logps, old, np.repeat(adv[:, None], 7, 1) * mask, mask)
    np.testing.assert_allclose(loss, np_gspo(logps, old, adv, mask, *eps), rtol=1e-5, atol=1e-6)
    s = np.exp(np.sum((logps.astype(np.float64) - old) * mask, 1) / np.maximum(mask.sum(1), 1))
    np.testing.assert_allclose(m["val/ratio"], np.sum(s * mask.sum(1)) / mask.sum(), rtol=1e-5)


def test_sequence_level_ratio_gradients_match_finite_differences_and_gspo(x64):
    logps, old, adv, mask = (a.astype(np.float64) for a in gspo_inputs(seed=15))
    adv_t = np.repeat(adv[:, None], 7, 1) * mask
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, aggregation="seq_mean_token_mean", ratio_level="sequence")
    fn = lambda lp: losses.ppo_policy_loss(lp, old, adv_t, mask, **kw)[0]
    check_grads(jax.jit(fn), (logps,), order=1, modes=["rev"])
    # GSPO's gradient: -A s / |y| on every token of an unclipped sequence, 0 on a clipped one.
    n = mask.sum(1)
    s = np.exp(np.sum((logps - old) * mask, 1) / np.maximum(n, 1))
    clipped = ((adv > 0) & (s > 1.28)) | ((adv < 0) & (s < 0.8))
    rows = np.sum(n > 0)
    want = np.where(clipped, 0.0, -adv * s / np.maximum(n, 1))[:, None] * mask / rows
    np.testing.assert_allclose(jax.grad(fn)(logps), want, rtol=1e-9, atol=1e-12)


def test_token_and_sequence_ratios_agree_for_one_token_responses():
    logps, old, adv, _ = gspo_inputs()
    mask = np.zeros_like(logps)
    mask[:, 0] = 1.0
    adv_t = adv[:, None] * mask
    kw = dict(clip_eps=0.2, aggregation="seq_mean_token_mean")
    token = jitted(losses.ppo_policy_loss, **kw)(logps, old, adv_t, mask)
    sequence = jitted(losses.ppo_policy_loss, ratio_level="sequence", **kw)(logps, old, adv_t, mask)
    for a, b in zip(jax.tree_util.tree_leaves(token), jax.tree_util.tree_leaves(sequence)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError):
        jitted(losses.ppo_policy_loss, ratio_level="group")(logps, old, adv_t, mask)


def test_overlong_penalty_is_dapos_soft_punishment():
    lengths = np.array([0, 10, 12, 13, 15, 16, 30])
    got = jitted(losses.overlong_penalty, max_len=16, buffer=4, factor=0.5)(lengths)
    want = [-0.5 * min(max((n - 12) / 4, 0.0), 1.0) for n in lengths]
    np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(ValueError):
        losses.overlong_penalty(lengths, max_len=16, buffer=0)


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
        losses.DPOConfig(**overrides)


# --------------------------------------------------------------------------
# CPO (Xu et al. 2024).


def np_cpo(pc, pr, beta):
    """CPO's preference term in float64: -log σ(β (c - r)) on summed log-probs, no reference."""
    return -np_log_sigmoid(beta * (np.asarray(pc, np.float64) - pr))


def test_cpo_loss_matches_numpy_and_its_gradients_the_closed_form(x64):
    pc, pr = dpo_inputs(seed=21, n=6)[:2]
    got = jitted(losses.cpo_loss, beta=0.2)(pc, pr)
    assert got.shape == (6,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_cpo(pc, pr, 0.2), **TOL)
    pc64, pr64 = pc.astype(np.float64), pr.astype(np.float64)
    fn = lambda c, r: jnp.sum(losses.cpo_loss(c, r, beta=0.2) * jnp.arange(1.0, 7.0))
    check_grads(jax.jit(fn), (pc64, pr64), order=1, modes=["rev"])
    # d/dc of -w log σ(β (c - r)) = -w β σ(-β (c - r)); the rejected side the opposite sign.
    want = -np.arange(1, 7) * 0.2 / (1 + np.exp(0.2 * (pc64 - pr64)))
    gc, gr = jax.grad(fn, argnums=(0, 1))(pc64, pr64)
    np.testing.assert_allclose(gc, want, rtol=1e-10)
    np.testing.assert_allclose(gr, -want, rtol=1e-10)


def test_cpo_loss_equals_trls_cpo_trainer_on_the_same_inputs():
    torch = pytest.importorskip("torch")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    pc, pr = dpo_inputs(seed=22, n=5)[:2]
    # TRL's loss reads these attributes of its trainer: sigmoid loss, no smoothing, no AlphaPO.
    trainer = types.SimpleNamespace(alpha=0.0, beta=0.3, loss_type="sigmoid", label_smoothing=0.0,
                                    accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(
        trainer, torch.tensor(pc, dtype=torch.float64), torch.tensor(pr, dtype=torch.float64))
    np.testing.assert_allclose(jitted(losses.cpo_loss, beta=0.3)(pc, pr), trl_losses.numpy(), **TOL)
    m = jitted(losses.cpo_metrics, beta=0.3)(jnp.zeros(5), jnp.float32(0.0), pc, pr)
    np.testing.assert_allclose(m["rewards/chosen"], trl_chosen.numpy().mean(), **TOL)
    np.testing.assert_allclose(m["rewards/margins"], (trl_chosen - trl_rejected).numpy().mean(), **TOL)


@pytest.mark.parametrize("overrides,match", [({"beta": 0.0}, "cpo.beta"), ({"alpha": -1.0}, "cpo.alpha")])
def test_bad_cpo_configs_are_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        losses.CPOConfig(**overrides)


# --------------------------------------------------------------------------
# BCO (Jung et al. 2024).


def np_bco(pol, ref, labels, delta, beta):
    """BCO's classifier loss in float64: -log σ(±(β (p - r) - δ)), + for desirable rows."""
    z = beta * (np.asarray(pol, np.float64) - ref) - delta
    return -np_log_sigmoid(np.where(labels, z, -z))


class NpRunningMoments:
    """TRL's RunningMoments (trl/trainer/utils.py, as BCOTrainer used it) in float64: the mean part."""

    def __init__(self):
        self.mean, self.count = 0.0, 1e-24

    def update(self, xs):
        xs = np.atleast_1d(np.asarray(xs, np.float64))
        delta, tot = xs.mean() - self.mean, self.count + xs.size
        self.mean += delta * xs.size / tot
        self.count = tot


def test_bco_loss_matches_numpy_and_the_shift_carries_no_gradient(x64):
    pol, ref, _, _, labels = kto_inputs(seed=31)
    got = jitted(losses.bco_loss, beta=0.3)(pol, ref, labels, jnp.float32(-0.7))
    assert got.shape == (6,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_bco(pol, ref, labels, -0.7, 0.3), **TOL)
    pol64, ref64 = pol.astype(np.float64), ref.astype(np.float64)
    fn = lambda p, d: jnp.sum(losses.bco_loss(p, ref64, labels, d, beta=0.3) * jnp.arange(1.0, 7.0))
    check_grads(jax.jit(lambda p: fn(p, 0.4)), (pol64,), order=1, modes=["rev"])
    # d/dp of -w log σ(s z), s = ±1: -w s β σ(-s z).
    z = 0.3 * (pol64 - ref64) - 0.4
    s = np.where(labels, 1.0, -1.0)
    np.testing.assert_allclose(jax.grad(fn)(pol64, 0.4), -np.arange(1, 7) * s * 0.3 / (1 + np.exp(s * z)),
                               rtol=1e-10)
    assert float(jax.grad(fn, argnums=1)(pol64, 0.4)) == 0.0


def test_bco_running_shift_is_trls_running_moments_mean_of_batch_means():
    rng = np.random.default_rng(32)
    trl = NpRunningMoments()
    carry = {"mean": jnp.float32(0.0), "count": jnp.float32(0.0)}
    step = jax.jit(losses.bco_running_mean)
    for n in (4, 6, 4, 8):
        rewards = rng.normal(0.5, 2.0, n).astype(np.float32)
        trl.update(rewards.astype(np.float64).mean())  # BCOTrainer: running.update(rewards.mean())
        carry = step(carry, rewards)
        np.testing.assert_allclose(carry["mean"], trl.mean, rtol=1e-6)
    assert float(carry["count"]) == 4.0
    assert float(jax.grad(lambda r: step(carry, r)["mean"])(jnp.ones(3))[0]) == 0.0


def test_bco_metrics_average_desirable_and_undesirable_rows_under_trl_names():
    pol, ref = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -2.0, -1.0])
    labels = jnp.array([True, True, False])
    out = jitted(losses.bco_metrics, beta=0.5)(jnp.array([0.1, 0.2, 0.3]), pol, ref, labels, jnp.float32(0.25))
    want = {"loss": 0.2, "rewards/chosen": 0.25, "rewards/rejected": -1.0, "rewards/margins": 1.25,
            "logps/chosen": -1.5, "logps/rejected": -3.0, "delta": 0.25, "count/chosen": 2, "count/rejected": 1}
    assert set(out) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(out[k], v, rtol=1e-6, err_msg=k)


def test_bad_bco_configs_are_errors():
    with pytest.raises(ValueError, match="bco.beta"):
        losses.BCOConfig(beta=-0.1)
