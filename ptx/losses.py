"""Pure, mask-aware losses of the supervised stages: SFT, reward model, DPO.

Also the token log-probs and masked reductions that every stage shares; the
RL losses (KL, GAE, PPO, GRPO) build on them in `ptx.rl_losses`.

Functions take arrays, never models, so each one is tested against a numpy
reference. Masks are explicit float arrays with 1 where a token counts.
String options (`loss_type`) are static Python values: an unknown one
raises ValueError at trace time. Arithmetic runs in at least float32
whatever the input dtype (float64 inputs stay float64, for grad tests).
"""
import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def as_float(x):
    """Casts to float32, or keeps float64: bf16 logits lose too much in a sum."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_choice(value, allowed, what):
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
    logits = as_float(logits)
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
    logits = as_float(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


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
    r_chosen, r_rejected = as_float(r_chosen), as_float(r_rejected)
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
    check_choice(loss_type, DPO_LOSS_TYPES, "DPO loss_type")
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
        chosen = as_float(policy_chosen_logps) / jnp.maximum(chosen_lengths, 1.0)
        rejected = as_float(policy_rejected_logps) / jnp.maximum(rejected_lengths, 1.0)
    elif reference_free:
        chosen, rejected = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    else:
        chosen = as_float(policy_chosen_logps) - ref_chosen_logps
        rejected = as_float(policy_rejected_logps) - ref_rejected_logps
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
