"""RL losses: KL penalties, GAE, the clipped PPO surrogate (token- or sequence-level ratios: PPO /
GSPO) and value loss, group advantages, DAPO's overlong penalty, the adaptive KL controller."""
import jax
import jax.numpy as jnp

from ptx.losses.tokens import _check, _float, masked_mean, masked_sum

__all__ = ["AGGREGATIONS", "GROUP_ADVANTAGE_KINDS", "KL_KINDS", "RATIO_LEVELS", "adaptive_kl_update", "aggregate",
           "gae", "group_advantages", "kl_penalty", "overlong_penalty", "ppo_policy_loss", "ppo_value_loss"]

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")
RATIO_LEVELS = ("token", "sequence")


# RL: KL, advantages, PPO.


def kl_penalty(logps, ref_logps, kind="k1"):
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    Schulman's estimators, with d = logps - ref_logps (any shape, float32):
        'k1': d                        unbiased, can be negative
        'k2': d^2 / 2                  biased, low variance
        'k3': exp(-d) - 1 + d          unbiased and >= 0
    """
    _check(kind, KL_KINDS, "KL kind")
    d = _float(logps) - ref_logps
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    # expm1 avoids the absolute error of exp(-d) - 1 near d = 0, and keeps k3 >= 0.
    return jnp.expm1(-d) + d


def gae(rewards, values, mask, *, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) along seq.

    Positions with mask 0 are transparent: a valid token's successor is the
    next valid token to its right, and the last valid token of a row is
    terminal (successor value and advantage 0). For valid t with successor u:
        delta_t = rewards_t + gamma * values_u - values_t
        A_t = delta_t + gamma * lam * A_u
    Rewards and values at mask-0 positions are ignored, so put each sequence's
    score on a valid token. Left padding, right padding and holes (e.g. tool
    output inside a turn) all work; mask is read as a boolean.

    Args:
        rewards, values, mask: [batch, seq] float32.
        gamma, lam: discount and GAE lambda.

    Returns:
        (advantages, returns), both [batch, seq] float32, 0 where mask is 0;
        returns = advantages + values.
    """
    rewards, values = _float(rewards), _float(values)
    valid = mask > 0

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, ok = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        carry = (jnp.where(ok, v, next_value), jnp.where(ok, adv, next_adv))
        return carry, jnp.where(ok, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
    _, advantages = jax.lax.scan(
        step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    advantages = advantages.T
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def aggregate(per_token, mask, kind):
    """Reduces a [batch, seq] per-token loss to a scalar.

        'token_mean': sum(x m) / sum(m) over the whole batch (DAPO): each
            token weighs the same.
        'seq_mean_token_mean': mean over rows of row sum / row count (GRPO):
            each sequence weighs the same; rows with no masked token are left out.
        'seq_mean_token_sum_norm': mean over all rows of row sum / seq, seq =
            per_token.shape[1] a constant (Dr. GRPO): no length bias.
    """
    _check(kind, AGGREGATIONS, "aggregation")
    if kind == "token_mean":
        return masked_mean(per_token, mask)
    row_sum = masked_sum(per_token, mask, axis=-1)
    if kind == "seq_mean_token_sum_norm":
        return jnp.mean(row_sum / per_token.shape[-1])
    row_count = jnp.sum(mask, axis=-1)
    row_mean = row_sum / jnp.maximum(row_count, 1.0)
    return masked_mean(row_mean, (row_count > 0).astype(row_mean.dtype))


def ppo_policy_loss(logps, old_logps, advantages, mask, *, clip_eps=0.2,
                    clip_eps_high=None, aggregation="token_mean", ratio_level="token"):
    """PPO clipped surrogate: per token max(-A ratio, -A clip(ratio, 1-ε, 1+ε_high)).

    ratio_level 'token' (PPO, GRPO): ratio = π(y_t) / π_old(y_t) per token.
    'sequence' (GSPO, Zheng et al. 2025): one ratio per sequence, the
    length-normalised s = exp(mean over its tokens of log π - log π_old),
    clipped as a whole (GSPO's range is about 3e-4 / 4e-4, not 0.2) and
    broadcast over its tokens; with 'seq_mean_token_mean' aggregation the loss
    is GSPO's mean over sequences of max(-A s, -A clip(s)), as TRL's
    importance_sampling_level='sequence' computes it.

    Args:
        logps, old_logps, advantages, mask: [batch, seq] float32; logps are under
            the current policy (the only input differentiated), old_logps under
            the policy that sampled.
        clip_eps, clip_eps_high: ratio clip range; clip_eps_high (DAPO's
            clip-higher) defaults to clip_eps.
        aggregation: see `aggregate`.
        ratio_level: 'token' | 'sequence'.

    Returns:
        (loss, {'loss/policy', 'policy/clipfrac', 'policy/approxkl', 'val/ratio'}):
        clipfrac is the fraction of masked tokens where the clipped term is the
        larger (the gradient is cut off); approxkl = 0.5 mean((logps-old)^2);
        ratio is the masked mean ratio.
    """
    _check(aggregation, AGGREGATIONS, "aggregation")
    _check(ratio_level, RATIO_LEVELS, "ratio_level")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Gradients flow only through the current policy, whatever the caller did.
    old_logps = jax.lax.stop_gradient(old_logps)
    advantages = jax.lax.stop_gradient(advantages)
    # Padding may hold -inf old log-probs; exp of their difference would be inf.
    log_ratio = jnp.where(mask > 0, _float(logps) - old_logps, 0.0)
    if ratio_level == "sequence":
        log_ratio = jnp.broadcast_to(masked_mean(log_ratio, mask, axis=-1)[..., None], log_ratio.shape)
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = aggregate(jnp.maximum(pg1, pg2), mask, aggregation)
    metrics = {
        "loss/policy": loss,
        "policy/clipfrac": masked_mean((pg2 > pg1).astype(ratio.dtype), mask),
        "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "val/ratio": masked_mean(ratio, mask),
    }
    return loss, metrics


def overlong_penalty(lengths, *, max_len, buffer, factor=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025): a reward added for length.

    0 up to max_len - buffer tokens, then falling linearly to -factor at max_len
    (and -factor beyond): -factor * clip((length - (max_len - buffer)) / buffer, 0, 1).

    Args:
        lengths: [batch] response lengths in tokens (int or float).
        max_len, buffer: Python ints, 0 < buffer <= max_len; factor: Python float.

    Returns:
        [batch] float32 penalties (<= 0).
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer={buffer} must be in (0, max_len={max_len}]")
    over = (jnp.asarray(lengths, jnp.float32) - (max_len - buffer)) / buffer
    return -factor * jnp.clip(over, 0.0, 1.0)


def ppo_value_loss(values, old_values, returns, mask, *, clip_value=0.2):
    """Clipped value loss: 0.5 masked_mean(max((v - R)^2, (v_clip - R)^2)).

    v_clip = old + clip(v - old, -clip_value, clip_value) keeps the critic near
    the values that produced the advantages.

    Args:
        values, old_values, returns, mask: [batch, seq] float32; values are the
            current predictions (the only input differentiated), old_values those
            at rollout time.

    Returns:
        (loss, {'loss/value', 'val/clipfrac', 'val/vpred'}): clipfrac is the
        fraction of masked tokens where the clipped error is the larger.
    """
    values = _float(values)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    clipped = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
    err = (values - returns) ** 2
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    metrics = {
        "loss/value": loss,
        "val/clipfrac": masked_mean((err_clipped > err).astype(err.dtype), mask),
        "val/vpred": masked_mean(values, mask),
    }
    return loss, metrics


def group_advantages(rewards, group_size, *, kind="grpo", eps=1e-6):
    """Critic-free advantages from groups of completions of the same prompt.

    Args:
        rewards: [batch] float32, each prompt's group_size completions
            consecutive; batch must be a multiple of group_size (a Python int).
        kind: 'grpo': (r - mean) / (std + eps), std the population std (ddof=0);
            'dr_grpo': r - mean (no std, Dr. GRPO);
            'rloo': r_i - mean of the group's other rewards (needs group_size >= 2).
        eps: keeps 'grpo' finite when a group's rewards are all equal.

    Returns:
        [batch] float32 advantages.
    """
    _check(kind, GROUP_ADVANTAGE_KINDS, "group advantage kind")
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch {rewards.shape[0]} is not a multiple of "
                         f"group_size {group_size}.")
    if kind == "rloo" and group_size < 2:
        raise ValueError("rloo needs group_size >= 2.")
    groups = _float(rewards).reshape(-1, group_size)
    mean = jnp.mean(groups, axis=-1, keepdims=True)
    if kind == "grpo":
        adv = (groups - mean) / (jnp.std(groups, axis=-1, keepdims=True) + eps)
    elif kind == "dr_grpo":
        adv = groups - mean
    else:
        baseline = (jnp.sum(groups, axis=-1, keepdims=True) - groups) / (group_size - 1)
        adv = groups - baseline
    return adv.reshape(-1)


def adaptive_kl_update(kl_coef, current_kl, *, target, horizon, n_steps):
    """Adaptive KL controller of Ziegler et al. 2019: the new KL coefficient.

    error = clip(current_kl / target - 1, -0.2, 0.2); the coefficient grows by
    the factor 1 + error * n_steps / horizon, n_steps being the samples seen
    since the last update. Python floats or scalar arrays; returns a scalar array.
    """
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
