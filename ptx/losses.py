"""Pure, mask-aware losses for every stage: SFT, reward model, DPO, PPO, GRPO.

Functions take arrays, never models, so each one is tested against a numpy
reference. Masks are explicit float arrays with 1 where a token counts.
String options (`loss_type`, `kind`, `aggregation`) are static Python values:
an unknown one raises ValueError at trace time. Arithmetic runs in at least
float32 whatever the input dtype (float64 inputs stay float64, for grad tests).
"""
import functools

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")


def _float(x):
    """Casts to float32, or keeps float64: bf16 logits lose too much in a sum."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {allowed}.")


# Token log-probabilities and masked reductions.


def token_logprobs(logits, targets):
    """Log-probability of each target token.

    Args:
        logits: [batch, seq, vocab] any float dtype.
        targets: [batch, seq] int32.

    Returns:
        [batch, seq] float32: log softmax(logits)[target].
    """
    logits = _float(logits)
    # Gather-then-logsumexp avoids writing a full [batch, seq, vocab] log-softmax.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def argmax(x):
    """jnp.argmax over the last axis (the lowest index among ties) as a max and a
    min-index reduction, which XLA's CPU backend vectorises, unlike the fused
    (value, index) reduce of jnp.argmax: [..., V] -> [...] int32."""
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def token_entropy(logits):
    """Entropy of the next-token distribution: [batch, seq, vocab] -> [batch, seq] float32."""
    logits = _float(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def chunked_token_logprobs(hidden, head, targets, *, vocab_major=False, chunk_size=1024, entropy=False):
    """`token_logprobs` (and `token_entropy`) of the LM head's logits, chunk_size tokens at a time.

    The largest buffers, forward and backward, are one chunk's [chunk_size,
    vocab] logits and their gradient: the [batch, seq, vocab] ones never exist.

    Args:
        hidden: [batch, seq, d_model] final-norm hidden states, compute dtype
            (the model's `Output.hidden`; `model.lm_head` gives the head).
        head: [d_model, vocab], or [vocab, d_model] with vocab_major (a tied
            embedding table); cast to hidden's dtype, as the model's head is.
        targets: [batch, seq] int32.
        chunk_size: tokens per chunk; the last one is padded.
        entropy: also return the entropies.

    Returns:
        [batch, seq] float32 log-probabilities, or (those, [batch, seq] float32
        entropies) with entropy=True.
    """
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    logps, ents = _head_logprobs(h, head.astype(hidden.dtype), y, vocab_major, entropy)
    unchunk = lambda x: x.reshape(-1)[:n].reshape(b, t)
    return (unchunk(logps), unchunk(ents)) if entropy else unchunk(logps)


def _head_logits(h, w, vocab_major):
    """[chunk, d] @ the head -> [chunk, vocab] float32, the product in h's dtype (as the model's)."""
    return _float(jnp.dot(h, w.T if vocab_major else w))


# A custom gradient rather than jax.checkpoint around each chunk: the backward
# pass then holds the recomputed logits and their gradient only (the checkpointed
# chunk's autodiff kept about four [chunk, vocab] buffers, this about two).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_logprobs(h, w, y, vocab_major, entropy):
    """h: [chunks, chunk, d]; w: the head in h's dtype; y: [chunks, chunk] int32 ->
    ([chunks, chunk] log-probs, [chunks, chunk] entropies or None)."""
    return _head_logprobs_fwd(h, w, y, vocab_major, entropy)[0]


def _head_logprobs_fwd(h, w, y, vocab_major, entropy):
    def one(xs):
        h_c, y_c = xs
        z = _head_logits(h_c, w, vocab_major)
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0] - lse
        ent = lse - jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1) if entropy else None
        return logp, ent, lse

    logps, ents, lse = jax.lax.map(one, (h, y))
    return (logps, ents), (h, w, y, ents, lse)


def _head_logprobs_bwd(vocab_major, entropy, res, grads):
    h, w, y, ents, lse = res
    g_logp, g_ent = grads

    def one(dw, xs):
        h_c, y_c, lse_c, g_c, ent_c, g_ent_c = xs
        logq = _head_logits(h_c, w, vocab_major) - lse_c[:, None]  # log-softmax
        p = jnp.exp(logq)
        # d logp[y] / dz = onehot(y) - p;  d entropy / dz = -p (log p + entropy).
        dz = g_c[:, None] * ((jnp.arange(p.shape[-1]) == y_c[:, None]) - p)
        if entropy:
            dz = dz - g_ent_c[:, None] * p * (logq + ent_c[:, None])
        dz = dz.astype(h.dtype)
        dh = jnp.dot(dz, w if vocab_major else w.T)
        return dw + _float(jnp.dot(dz.T, h_c) if vocab_major else jnp.dot(h_c.T, dz)), dh

    dw, dh = jax.lax.scan(one, _float(jnp.zeros(w.shape, w.dtype)), (h, y, lse, g_logp, ents, g_ent))
    return dh, dw.astype(w.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)


def masked_sum(x, mask, axis=None):
    """Sum of x * mask over `axis` (all axes if None); x and mask broadcast."""
    # Padding may hold inf or NaN (e.g. -inf log-probs); 0 * inf would be NaN.
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / max(sum(mask), 1) over `axis`: 0, not NaN, when empty."""
    count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) with mean and unbiased var over masked entries.

    With shift_mean=False the mean is added back (only the scale changes).
    Same shape and dtype as x; masked-out entries are 0.
    """
    mean = masked_mean(x, mask)
    count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)))
    var = masked_sum((x - mean) ** 2, mask) / jnp.maximum(count - 1.0, 1.0)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


def sequence_logps(token_logps, mask, *, normalize=False):
    """Per-sequence log-probability from per-token ones.

    Args:
        token_logps: [batch, seq] float32.
        mask: [batch, seq] float, 1 on response tokens.
        normalize: divide by the number of masked tokens (SimPO, IPO).

    Returns:
        [batch] float32.
    """
    if normalize:
        return masked_mean(token_logps, mask, axis=-1)
    return masked_sum(token_logps, mask, axis=-1)


# Supervised fine-tuning and reward modelling.


def sft_loss(logits, targets, mask):
    """Mean token cross-entropy over masked tokens.

    Args:
        logits: [batch, seq, vocab] any float dtype.
        targets: [batch, seq] int32.
        mask: [batch, seq] float, 1 on tokens that are trained on.

    Returns:
        (loss scalar float32, {'loss', 'accuracy', 'num_tokens'}).
    """
    loss = masked_mean(-token_logprobs(logits, targets), mask)
    correct = (argmax(logits) == targets).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean(correct, mask),
        "num_tokens": jnp.sum(mask),
    }
    return loss, metrics


def _soft_label_loss(z, p):
    """-(p log σ(z) + (1 - p) log σ(-z)): Bradley-Terry NLL with P(chosen wins) = p."""
    # Same value via log σ(-z) = log σ(z) - z, but bit-exact where it matters:
    # the hard loss at p = 1 and log 2 at z = 0 (policy == reference).
    return (1.0 - p) * z - jax.nn.log_sigmoid(z)


def pairwise_reward_loss(r_chosen, r_rejected, margin=None, prob_chosen=None,
                         center_coef=0.0):
    """Bradley-Terry loss of a scalar reward model on preference pairs.

    Args:
        r_chosen, r_rejected: [batch] float32 rewards.
        margin: optional [batch] float32 required gap (Llama 2), subtracted from
            the difference.
        prob_chosen: optional [batch] float32 soft label in [0, 1] (e.g. from an
            AI judge); None is the hard label p = 1.
        center_coef: weight of mean((r_chosen + r_rejected)^2), which pins rewards
            near zero (Eisenstein et al. 2023) without changing their differences.

    Returns:
        (loss scalar, {'loss', 'accuracy', 'margin_mean', 'reward_mean',
        'reward_std'}). accuracy is mean(r_chosen > r_rejected), margin ignored,
        ties count 0; reward_mean / reward_std (population) are over both rewards.
    """
    r_chosen, r_rejected = _float(r_chosen), _float(r_rejected)
    diff = r_chosen - r_rejected
    z = diff if margin is None else diff - margin
    p = 1.0 if prob_chosen is None else prob_chosen
    loss = jnp.mean(_soft_label_loss(z, p))
    loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
    both = jnp.concatenate([r_chosen, r_rejected])
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "margin_mean": jnp.mean(diff),
        "reward_mean": jnp.mean(both),
        "reward_std": jnp.std(both),
    }
    return loss, metrics


# Direct preference optimisation.


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
             prob_chosen=None, chosen_lengths=None, rejected_lengths=None, gamma=0.0):
    """Per-pair DPO-family losses and implicit rewards.

    Inputs are [batch] float32 sequence log-probs summed over response tokens.
    With c = policy_chosen - ref_chosen and r = policy_rejected - ref_rejected
    (ref terms dropped when reference_free) and logits = c - r:
        'sigmoid': -(1-ls) log σ(β logits) - ls log σ(-β logits)   (DPO, cDPO)
        'ipo':     (logits - 1/(2β))^2          (IPO; TRL feeds it mean log-probs)
        'hinge':   relu(1 - β logits)           (SLiC)
        'simpo':   as 'sigmoid' on β logits - gamma, where c = policy_chosen /
                   chosen_lengths and r = policy_rejected / rejected_lengths
                   (always reference-free; lengths are [batch] token counts).
    prob_chosen ([batch] in [0, 1], a judge's soft label) replaces 1 - ls in
    'sigmoid' / 'simpo'. beta, label_smoothing and gamma are Python floats.
    Reference log-probs may be None when unused.

    Returns:
        (losses [batch], chosen_rewards [batch], rejected_rewards [batch]);
        rewards are β c and β r, stop-gradient'ed.
    """
    _check(loss_type, DPO_LOSS_TYPES, "DPO loss_type")
    if label_smoothing and prob_chosen is not None:
        raise ValueError("Give label_smoothing or prob_chosen, not both.")
    if loss_type in ("ipo", "hinge") and (label_smoothing or prob_chosen is not None):
        raise ValueError(f"{loss_type!r} takes no label_smoothing / prob_chosen.")
    if gamma and loss_type != "simpo":
        raise ValueError("gamma is the SimPO margin; it needs loss_type='simpo'.")

    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths.")
        # An empty (filler) pair must give a finite loss, not NaN, to be masked.
        chosen = _float(policy_chosen_logps) / jnp.maximum(chosen_lengths, 1.0)
        rejected = _float(policy_rejected_logps) / jnp.maximum(rejected_lengths, 1.0)
    elif reference_free:
        chosen, rejected = _float(policy_chosen_logps), _float(policy_rejected_logps)
    else:
        chosen = _float(policy_chosen_logps) - ref_chosen_logps
        rejected = _float(policy_rejected_logps) - ref_rejected_logps
    logits = chosen - rejected

    if loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    else:
        p = 1.0 - label_smoothing if prob_chosen is None else prob_chosen
        losses = _soft_label_loss(beta * logits - gamma, p)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected)
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps,
                policy_rejected_logps):
    """Batch means of dpo_loss outputs under TRL's metric names; all inputs [batch]."""
    return {
        "loss": jnp.mean(losses),
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean(
            (chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
    }


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
                    clip_eps_high=None, aggregation="token_mean"):
    """PPO clipped surrogate: per token max(-A ratio, -A clip(ratio, 1-ε, 1+ε_high)).

    Args:
        logps, old_logps, advantages, mask: [batch, seq] float32; logps are under
            the current policy (the only input differentiated), old_logps under
            the policy that sampled.
        clip_eps, clip_eps_high: ratio clip range; clip_eps_high (DAPO's
            clip-higher) defaults to clip_eps.
        aggregation: see `aggregate`.

    Returns:
        (loss, {'loss/policy', 'policy/clipfrac', 'policy/approxkl', 'val/ratio'}):
        clipfrac is the fraction of masked tokens where the clipped term is the
        larger (the gradient is cut off); approxkl = 0.5 mean((logps-old)^2);
        ratio is the masked mean ratio.
    """
    _check(aggregation, AGGREGATIONS, "aggregation")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Gradients flow only through the current policy, whatever the caller did.
    old_logps = jax.lax.stop_gradient(old_logps)
    advantages = jax.lax.stop_gradient(advantages)
    # Padding may hold -inf old log-probs; exp of their difference would be inf.
    log_ratio = jnp.where(mask > 0, _float(logps) - old_logps, 0.0)
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
